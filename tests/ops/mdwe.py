#!/usr/bin/env python3
"""Checks that tern runs under MemoryDenyWriteExecute=yes: the kernel's own equivalent,
prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux 6.3+, kept across execve), refuses any
mapping that is or becomes writable and executable. `tern demo` then has to encode (FFmpeg),
do TLS/QUIC and DTLS (aws-lc) and serve HLS. Usage: mdwe.py TERN_BINARY"""
import ctypes, mmap, os, re, sys, tempfile, time, urllib.request

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
tern = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
err = tempfile.TemporaryFile()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.dup2(w, 1)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os.write(2, b"mdwe: kernel without PR_SET_MDWE\n")
        os._exit(77)
    try:  # the mechanism itself: a writable+executable mapping must now be refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        os.write(2, b"mdwe: PR_SET_MDWE set but W+X mapping allowed\n")
        os._exit(78)
    except PermissionError:
        pass
    os.dup2(err.fileno(), 2)
    os.execv(tern, [tern, "demo", "--http", "127.0.0.1:0"])
os.close(w)
out = os.fdopen(r)
base, deadline = None, time.time() + 30
while time.time() < deadline:
    line = out.readline()
    if not line:
        break
    m = re.search(r"health:\s+(http://\S+)/health", line)
    if m:
        base = m.group(1)
        break

def stop():
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass
    return os.waitpid(pid, 0)[1]

if base is None:
    status = stop()
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 77:
        print("mdwe: SKIPPED (kernel has no PR_SET_MDWE)")
        sys.exit(0)
    err.seek(0)
    sys.exit(f"mdwe: tern demo did not start under MDWE (status {status})\n{err.read().decode()}")
ok = False
for _ in range(40):
    try:
        body = urllib.request.urlopen(f"{base}/hls/demo/64k/index.m3u8", timeout=2).read().decode()
        if ".m4s" in body:
            ok = True
            break
    except Exception:
        pass
    time.sleep(0.5)
health = urllib.request.urlopen(f"{base}/health", timeout=2).read().decode()
status = stop()
if not ok:
    sys.exit("mdwe: no HLS segment within 20 s under MDWE")
if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
    sys.exit(f"mdwe: tern demo exit status {status} under MDWE")
print("mdwe: tern demo encoded HLS, served /health and exited 0 with write-xor-execute enforced")
