#!/usr/bin/env bash
# The operations tests: the binary under systemd's protocol (sd_notify, SIGHUP, SIGTERM) and
# under write-xor-execute, the systemd units (verify, sandbox score), the Prometheus rules,
# the Grafana dashboards, ansible-lint, every config the inventory renders checked by
# `tern check-config`, and site.yml applied twice to a real debootstrap'd Debian 12 (chroot):
# the second run must change nothing.
#
# Needs root (chroot). The Debian base tree is cached in target/ops/cache (debootstrap once,
# ~2 min; later runs copy it). TERN_OPS_SKIP_CHROOT=1 skips the chroot part.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
t_all=$(date +%s)
step() { echo "ops: $*"; }
took() { echo "ops: ... $(( $(date +%s) - $1 )) s"; }

scripts/setup-ops
ops=$root/target/ops
export PATH=$ops/venv/bin:$PATH ANSIBLE_COLLECTIONS_PATH=$ops/collections
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0
[[ -f web/node_modules/hls.js/dist/hls.min.js ]] || npm ci --prefix web --no-audit --no-fund >/dev/null
tern=$root/target/debug/tern
[[ -x $tern ]] || cargo build --bin tern
work=$(mktemp -d /tmp/tern-ops.XXXXXX)
target=""
cleanup() {
  [[ -n $target && -d $target ]] && rm -rf --one-file-system "$target"
  rm -rf "$work"
}
trap cleanup EXIT

# --- the binary as systemd runs it -----------------------------------------------------
t=$(date +%s); step "sd_notify, watchdog, SIGHUP reload, SIGTERM"
python3 tests/ops/lifecycle.py "$tern"
python3 tests/ops/mdwe.py "$tern"
took "$t"

# --- units ------------------------------------------------------------------------------
t=$(date +%s); step "systemd units: verify and sandbox exposure"
uroot=$work/unitroot
mkdir -p "$uroot/usr/local/bin" "$uroot/etc/systemd/system" "$uroot/usr/lib/systemd" "$uroot/bin"
cp "$tern" "$uroot/usr/local/bin/tern"
cp -a /usr/lib/systemd/system "$uroot/usr/lib/systemd/"
cp /bin/kill "$uroot/bin/kill"
cp systemd/*.service "$uroot/etc/systemd/system/"
# The harness must see a bad key (verify only warns, exit 0): any output is a failure.
printf '[Service]\nExecStart=/usr/local/bin/tern relay\nBogusKey=1\n' >"$uroot/etc/systemd/system/tern-selftest.service"
[[ -n "$(systemd-analyze verify --root="$uroot" tern-selftest.service 2>&1)" ]] \
  || { echo "ops: systemd-analyze verify no longer reports unknown keys" >&2; exit 1; }
rm "$uroot/etc/systemd/system/tern-selftest.service"
for unit in systemd/*.service; do
  u=$(basename "$unit")
  out=$(systemd-analyze verify --root="$uroot" "$u" 2>&1 || true)
  [[ -z $out ]] || { echo "ops: systemd-analyze verify $u:" >&2; echo "$out" >&2; exit 1; }
  score=$(SYSTEMD_LOG_LEVEL=err systemd-analyze security --offline=yes --root="$uroot" "$u" \
    | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  echo "ops: $u: verify clean, exposure $score"
  awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' \
    || { echo "ops: $u exposure $score > 2.0" >&2; exit 1; }
done
took "$t"

# --- monitoring -------------------------------------------------------------------------
t=$(date +%s); step "Prometheus rules and Grafana dashboards"
promtool check rules ops/prometheus/tern-alerts.yml
promtool test rules ops/prometheus/tern-alerts.test.yml
python3 tests/ops/check_dashboards.py ops/grafana/*.json
took "$t"

# --- Ansible: lint, rendered configs ----------------------------------------------------
t=$(date +%s); step "ansible-lint (production profile)"
(cd ansible && ansible-lint --profile production --nocolor -q)
took "$t"

t=$(date +%s); step "every rendered config passes tern check-config"
(cd ansible && ansible-playbook render-configs.yml -e tern_render_dir="$work/rendered" >"$work/render.log") \
  || { cat "$work/render.log"; exit 1; }
n=0
for f in "$work"/rendered/*/*.toml; do
  "$tern" check-config --config "$f" >/dev/null
  n=$((n + 1))
done
echo "ops: $n rendered files valid"
# A region with a hub: the hub serves the link, its edge pulls from it, and both configs
# pass check-config.
(cd ansible && ansible-playbook -i ../tests/ops/hub-inventory.yml render-configs.yml \
  -e tern_render_dir="$work/hub" >"$work/render-hub.log") || { cat "$work/render-hub.log"; exit 1; }
for f in "$work"/hub/relay-*/relay.toml; do "$tern" check-config --config "$f" >/dev/null; done
grep -q '^\[relay.link\]' "$work/hub/relay-hub/relay.toml"
grep -q '^listen = "0.0.0.0:4444"' "$work/hub/relay-hub/relay.toml"
! grep -q 'relay.link' "$work/hub/relay-edge/relay.toml"
grep -q '^addr = "10.1.0.21:4444"' "$work/hub/relay-edge/relay.toml"
grep -q '^server_name = "relay-hub"' "$work/hub/relay-edge/relay.toml"
grep -q '^addr = "10.1.0.10:4443"' "$work/hub/relay-hub/relay.toml"
echo "ops: hub and edge configs rendered and valid"
(cd ansible && ansible-playbook --syntax-check site.yml rolling-upgrade.yml >/dev/null)
took "$t"

# --- Ansible against a real Debian 12 ---------------------------------------------------
if [[ ${TERN_OPS_SKIP_CHROOT:-} == 1 ]]; then
  echo "ops: chroot run skipped (TERN_OPS_SKIP_CHROOT=1)"
else
  t=$(date +%s); step "site.yml on a debootstrap'd Debian 12, twice"
  base=$ops/cache/bookworm-base
  if [[ ! -d $base ]]; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    step "debootstrap bookworm from $mirror (cached in $base)"
    mkdir -p "$ops/cache"
    rm -rf "$base.tmp"
    debootstrap --variant=minbase \
      --include=python3,systemd,libavcodec59,libavutil57,libswresample4,nftables,procps,ca-certificates \
      bookworm "$base.tmp" "$mirror" >"$ops/cache/debootstrap.log" 2>&1 \
      || { tail -20 "$ops/cache/debootstrap.log"; exit 1; }
    mv "$base.tmp" "$base"
  fi
  target=$ops/cache/target.$$
  cp -a "$base" "$target"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=origin.tern.test -addext subjectAltName=DNS:origin.tern.test \
    -keyout "$work/origin.key" -out "$work/origin.pem" 2>/dev/null
  # Host vars: in an inventory file they outrank the playbooks' group_vars/all, group vars
  # do not.
  cat >"$work/inventory.yml" <<INV
all:
  children:
    tern:
      hosts:
        tern-test:
          ansible_host: $target
          ansible_connection: community.general.chroot
          ansible_python_interpreter: /usr/bin/python3
          ansible_become: false
          tern_live: false
          tern_region: us-east-1
          tern_latitude: 39.04
          tern_longitude: -77.49
          tern_upstream_host: tern-test
          tern_private_ip: 127.0.0.1
          relay_public_ip: 192.0.2.1
          tern_public_url: https://relay.tern.test
          tern_binary_src: $tern
          tern_origin_cert_src: $work/origin.pem
          tern_origin_key_src: $work/origin.key
          tern_origin_server_name: origin.tern.test
    origins: {hosts: {tern-test: }}
    packagers: {hosts: {tern-test: }}
    relays: {hosts: {tern-test: }}
INV
  for run in 1 2; do
    (cd ansible && ansible-playbook -i "$work/inventory.yml" site.yml >"$work/site$run.log" 2>&1) \
      || { cat "$work/site$run.log"; exit 1; }
    grep -A1 '^PLAY RECAP' "$work/site$run.log" | tail -1 | sed "s/^/ops: run $run: /"
  done
  grep -A1 '^PLAY RECAP' "$work/site2.log" | tail -1 | grep -q ' changed=0 ' \
    || { echo "ops: second run changed something:" >&2; grep -B2 '^changed' "$work/site2.log" >&2; exit 1; }
  # What the run left on the host.
  for svc in origin relay packager; do
    chroot "$target" /usr/local/bin/tern check-config --config /etc/tern/$svc.toml >/dev/null
    [[ $(systemctl --root="$target" is-enabled tern-$svc.service) == enabled ]]
    out=$(systemd-analyze verify --root="$target" tern-$svc.service 2>&1 || true)
    [[ -z $out ]] || { echo "$out" >&2; exit 1; }
  done
  [[ $(chroot "$target" stat -c %U:%G:%a /etc/tern/relay.toml) == root:tern:640 ]]
  [[ $(systemctl --root="$target" is-enabled nftables.service) == enabled ]]
  grep -q 'net.core.rmem_max = 26214400' "$target/etc/sysctl.d/60-tern.conf"
  echo "ops: target has the binary, configs (check-config ok), enabled units (verify clean)"
  took "$t"
fi
echo "ops: all operations tests passed in $(( $(date +%s) - t_all )) s"
