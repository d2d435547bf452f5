//! Where storage commands go: a local directory here; S3 lives behind the same trait.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::{Command, Error};

/// Applies storage commands, in the order the packager produced them.
pub trait Sink {
    fn apply(&mut self, command: &Command) -> Result<(), Error>;
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn apply(&mut self, command: &Command) -> Result<(), Error> {
        (**self).apply(command)
    }
}

/// Writes one broadcast's objects under a root directory.
///
/// Puts are atomic (written to a temporary file in the same directory, then renamed), so an
/// HTTP server reading the directory never serves a half-written playlist or segment.
/// Deleting a missing file is not an error: deletes are idempotent, as on S3.
#[derive(Debug, Clone)]
pub struct DirectorySink {
    root: PathBuf,
}

/// Distinguishes temporary files of concurrent writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl DirectorySink {
    /// `root` is the broadcast's folder; it is created if missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| Error::Io {
            path: root.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn resolve(&self, path: &str) -> Result<PathBuf, Error> {
        let rel = Path::new(path);
        // Paths come from the packager, but a sink writing to disk still refuses anything that
        // could leave its root.
        let safe = !path.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(Error::InvalidPath(path.to_owned()));
        }
        Ok(self.root.join(rel))
    }

    fn put(&self, path: &str, body: &[u8]) -> Result<(), Error> {
        let target = self.resolve(path)?;
        let io_err = |source| Error::Io {
            path: target.clone(),
            source,
        };
        let dir = target.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io_err)?;
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let temp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(body)?;
            // No fsync: a live object is superseded within seconds, and a crash loses the
            // broadcast's state anyway; rename alone gives readers the atomicity they need.
            drop(file);
            fs::rename(&temp, &target)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&temp);
            io_err(source)
        })
    }

    fn delete(&self, path: &str) -> Result<(), Error> {
        let target = self.resolve(path)?;
        match fs::remove_file(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::Io {
                path: target,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

impl Sink for DirectorySink {
    fn apply(&mut self, command: &Command) -> Result<(), Error> {
        match command {
            Command::Put { path, body, .. } => self.put(path, body),
            Command::Delete { path } => self.delete(path),
        }
    }
}

/// Applies every command to two sinks (e.g. a local folder and S3). Both always get the
/// command; the first error is returned.
#[derive(Debug)]
pub struct TeeSink<A, B>(pub A, pub B);

impl<A: Sink, B: Sink> Sink for TeeSink<A, B> {
    fn apply(&mut self, command: &Command) -> Result<(), Error> {
        let a = self.0.apply(command);
        let b = self.1.apply(command);
        a.and(b)
    }
}

/// Keeps objects in memory: for tests and for embedding (e.g. serving straight from RAM).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    pub objects: BTreeMap<String, Bytes>,
}

impl Sink for MemorySink {
    fn apply(&mut self, command: &Command) -> Result<(), Error> {
        match command {
            Command::Put { path, body, .. } => {
                self.objects.insert(path.clone(), body.clone());
            }
            Command::Delete { path } => {
                self.objects.remove(path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;
    use crate::ObjectKind;

    fn temp_root(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tern-sink-{tag}-{}", std::process::id()))
    }

    #[test]
    fn directory_sink_puts_atomically_and_deletes_idempotently() {
        let root = temp_root("dir");
        let _ = fs::remove_dir_all(&root);
        let mut sink = DirectorySink::new(&root).unwrap();
        let put = Command::Put {
            path: "64k/7.m4s".into(),
            body: Bytes::from_static(b"abc"),
            kind: ObjectKind::Segment,
            captured_us: None,
        };
        sink.apply(&put).unwrap();
        assert_eq!(fs::read(root.join("64k/7.m4s")).unwrap(), b"abc");
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(root.join("64k"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let del = Command::Delete {
            path: "64k/7.m4s".into(),
        };
        sink.apply(&del).unwrap();
        sink.apply(&del).unwrap();
        assert!(!root.join("64k/7.m4s").exists());
        for bad in ["../x", "/etc/passwd", "", "a/../../b"] {
            let cmd = Command::Delete { path: bad.into() };
            assert!(
                matches!(sink.apply(&cmd), Err(Error::InvalidPath(_))),
                "{bad}"
            );
        }
        fs::remove_dir_all(&root).unwrap();
    }
}
