#!/usr/bin/env python3
"""Runs `tern origin` the way systemd would (NOTIFY_SOCKET, WATCHDOG_USEC), then checks:
READY=1 once serving, WATCHDOG=1 pings, SIGHUP applies [log] level live and names the keys
that need a restart, an invalid file on SIGHUP keeps the old configuration, and SIGTERM
sends STOPPING=1 and exits 0. Usage: lifecycle.py TERN_BINARY"""
import os, signal, socket, subprocess, sys, tempfile, time

tern = sys.argv[1]
d = tempfile.mkdtemp(prefix="tern-lifecycle-")
sock_path = os.path.join(d, "notify.sock")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sock_path)
s.settimeout(20)
cfg = os.path.join(d, "origin.toml")

def write(text):
    with open(cfg + ".new", "w") as f:
        f.write(text)
    os.replace(cfg + ".new", cfg)

base = '[http]\nlisten = "127.0.0.1:0"\n[origin]\nlisten = "127.0.0.1:0"\n'
write(base + '[log]\nlevel = "info"\n')
env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("TERN_")}
env.update(NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000")
log = open(os.path.join(d, "stderr"), "w+")
p = subprocess.Popen([tern, "origin", "--config", cfg], env=env, stdout=subprocess.DEVNULL, stderr=log)

def expect(prefix, within=20):
    end = time.time() + within
    while time.time() < end:
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            break
        if msg.startswith(prefix):
            return msg
    fail(f"no {prefix!r} from tern")

def fail(why):
    p.kill()
    log.seek(0)
    sys.exit(f"lifecycle: {why}\n--- tern stderr ---\n{log.read()}")

def log_text():
    log.flush()
    with open(log.name) as f:
        return f.read()

def wait_log(needle, within=10):
    end = time.time() + within
    while time.time() < end:
        if needle in log_text():
            return
        time.sleep(0.1)
    fail(f"log never said {needle!r}")

t0 = time.time()
print("lifecycle: READY:", expect("READY=1").replace("\n", " | "))
expect("WATCHDOG=1", within=3)
expect("WATCHDOG=1", within=3)
print(f"lifecycle: watchdog pings every ~0.5 s (after {time.time() - t0:.1f} s)")

# Live change: log level to debug, plus a key that needs a restart.
write(base.replace("[origin]\n", "[origin]\nbitrate = 96000\n") + '[log]\nlevel = "debug"\n')
p.send_signal(signal.SIGHUP)
expect("RELOADING=1")
expect("READY=1")
wait_log("log filter applied")
wait_log("origin.bitrate")
print("lifecycle: SIGHUP applied log.level and named origin.bitrate as needing a restart")

# An invalid file: reload fails, the process keeps running.
write(base + '[log]\nlevel = "debug"\nbogus = 1\n')
p.send_signal(signal.SIGHUP)
expect("RELOADING=1")
expect("READY=1")
wait_log("reload failed")
if p.poll() is not None:
    fail("tern exited after an invalid reload")
print("lifecycle: invalid file on SIGHUP kept the running configuration")

p.send_signal(signal.SIGTERM)
expect("STOPPING=1")
try:
    rc = p.wait(timeout=30)
except subprocess.TimeoutExpired:
    fail("tern did not exit within 30 s of SIGTERM")
if rc != 0:
    fail(f"exit status {rc}")
print("lifecycle: SIGTERM -> STOPPING=1, exit 0")
