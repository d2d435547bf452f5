//! The CloudFormation template of docs/cdn.md passes cfn-lint (installed by scripts/setup into
//! target/venv) and keeps the cache settings the packager's Cache-Control relies on.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn cloudformation_template_passes_cfn_lint() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let template = root.join("cdn/cloudformation.yaml");
    let lint = root.join("target/venv/bin/cfn-lint");
    assert!(
        lint.exists(),
        "{} is missing: run scripts/setup",
        lint.display()
    );
    let out = Command::new(&lint).arg(&template).output().unwrap();
    assert!(
        out.status.success(),
        "cfn-lint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&template).unwrap();
    for needle in [
        "MinTTL: 0",
        "MaxTTL: 31536000",
        "OriginAccessControlId",
        "ErrorCachingMinTTL: 1",
        "QueryStringBehavior: none",
    ] {
        assert!(text.contains(needle), "template lost {needle}");
    }
}
