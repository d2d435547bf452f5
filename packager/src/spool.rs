//! An on-disk, ordered queue of storage commands waiting to be uploaded.
//!
//! The packager thread appends every command it produces ([`Spool::append`]); the uploader
//! takes each entry that may go out now ([`Spool::next_ready`], several at a time when the
//! ordering rules allow), uploads it, and removes it ([`Spool::complete`]). Entries are files named by a sequence number, written to a temporary
//! name and renamed, so a crash (even `kill -9`) leaves only whole entries, and a restart
//! ([`Spool::open`]) resumes where the last run stopped, in order.
//!
//! # Ordering rules (what keeps every stored playlist valid)
//!
//! An entry is *pending* from [`Spool::append`] until [`Spool::complete`], including while it
//! is being uploaded. [`Spool::next_ready`] hands out an entry only when:
//!
//! - no earlier entry for the same path is pending: writes to one object happen in the order
//!   produced, one at a time (so an older playlist can never land after a newer one);
//! - for a playlist (media or master): no earlier put of a segment or init segment of the same
//!   folder is pending: a playlist never names a segment (or an `EXT-X-MAP`) that is not stored
//!   yet;
//! - for a delete of an expired segment: a playlist that no longer names it has been stored
//!   (the delete records the sequence number of the playlist queued before it, and waits while
//!   that playlist or a newer one of the same folder is pending).
//!
//! Anything else may go out at once and in parallel: segments of different renditions, and
//! the segments of one rendition after an outage. Only the newest playlist per path needs
//! uploading: appending a playlist drops an older queued one for the same path (unless it is
//! being uploaded right now). During an outage the queue therefore holds at most one or two
//! playlists per rendition.
//!
//! # Bound
//!
//! `max_bytes` bounds the bytes of queued entries. When a segment would exceed it, the oldest
//! queued segment that already has its delete queued (expired in a live window: nobody will ever
//! fetch it) is dropped together with that delete. If there is none (recording, or a window
//! larger than the spool), the new segment is refused with [`Error::SpoolFull`] and counted:
//! size the spool for the longest outage to ride out (64 + 128 kbps ≈ 86 MB per hour).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::{Command, Error, ObjectKind};

const SUFFIX: &str = "entry";

/// What a queued entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(ObjectKind),
    /// Delete, once a playlist with a sequence number `>= after_playlist` of the same folder has
    /// been uploaded (0: no playlist to wait for).
    Delete {
        after_playlist: u64,
    },
}

/// One queued command, without its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub op: Op,
    pub path: String,
    /// Bytes on disk (header + body).
    pub size: u64,
    /// When the command was appended.
    pub enqueued: SystemTime,
    /// Segments: the origin's capture time of the segment's end, µs since the Unix epoch (see
    /// [`Command::Put`]).
    pub captured_us: Option<u64>,
}

impl Entry {
    fn folder(&self) -> &str {
        folder(&self.path)
    }

    fn is_playlist(&self) -> bool {
        self.op == Op::Put(ObjectKind::MediaPlaylist)
    }

    /// A put of an object that playlists name (segment or init segment).
    fn is_media(&self) -> bool {
        matches!(
            self.op,
            Op::Put(ObjectKind::Segment) | Op::Put(ObjectKind::InitSegment)
        )
    }
}

fn folder(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(f, _)| f)
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<u64, Entry>,
    next_seq: u64,
    bytes: u64,
    /// Entries handed out by `next_ready` and not yet completed or released.
    in_flight: BTreeSet<u64>,
    /// Segments refused or evicted because the spool was full.
    dropped: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl Spool {
    /// Opens (creating if needed) the spool folder and loads the entries a previous run left.
    /// Leftover temporary files (a crash mid-write) are removed.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut state = State {
            next_seq: 1,
            ..State::default()
        };
        for item in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let item = item.map_err(io_error(&dir))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            let path = item.path();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(seq) = name
                .strip_suffix(&format!(".{SUFFIX}"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            match read_header(&path, seq) {
                Ok(entry) => {
                    state.bytes += entry.size;
                    state.next_seq = state.next_seq.max(seq + 1);
                    state.entries.insert(seq, entry);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable spool entry removed: {e}");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        if !state.entries.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                entries = state.entries.len(),
                bytes = state.bytes,
                "resuming uploads left by a previous run"
            );
        }
        Ok(Self {
            dir,
            max_bytes,
            state: Mutex::new(state),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is a single
        // step after the file operation), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{SUFFIX}"))
    }

    /// Queues a command (on the caller's thread: a small file write and rename).
    pub fn append(&self, command: &Command) -> Result<(), Error> {
        let mut st = self.lock();
        let seq = st.next_seq;
        let enqueued = SystemTime::now();
        let (op, path, body, captured_us) = match command {
            Command::Put {
                path,
                body,
                kind,
                captured_us,
            } => (Op::Put(*kind), path, body.clone(), *captured_us),
            Command::Delete { path } => {
                let after_playlist = st
                    .entries
                    .values()
                    .rev()
                    .find(|e| e.is_playlist() && e.folder() == folder(path))
                    .map_or(0, |e| e.seq);
                (Op::Delete { after_playlist }, path, Bytes::new(), None)
            }
        };
        let header = header_line(&op, path, enqueued, captured_us);
        let size = (header.len() + body.len()) as u64;
        if op == Op::Put(ObjectKind::Segment) && st.bytes + size > self.max_bytes {
            self.evict_expired(&mut st, size);
            if st.bytes + size > self.max_bytes {
                st.dropped += 1;
                metrics::counter!("tern_packager_spool_dropped_total").increment(1);
                return Err(Error::SpoolFull {
                    path: self.dir.clone(),
                    object: path.clone(),
                    bytes: st.bytes,
                    max: self.max_bytes,
                });
            }
        }
        let target = self.file(seq);
        let temp = self.dir.join(format!(".{seq:020}.tmp"));
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&temp)?;
            f.write_all(header.as_bytes())?;
            f.write_all(&body)?;
            drop(f);
            fs::rename(&temp, &target)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&temp);
            return Err(io_error(&target)(e));
        }
        st.next_seq = seq + 1;
        st.bytes += size;
        // Only the newest playlist per path needs to go out.
        if op == Op::Put(ObjectKind::MediaPlaylist) {
            let older: Vec<u64> = st
                .entries
                .values()
                .filter(|e| e.is_playlist() && e.path == *path && !st.in_flight.contains(&e.seq))
                .map(|e| e.seq)
                .collect();
            for old in older {
                self.remove(&mut st, old);
            }
        }
        st.entries.insert(
            seq,
            Entry {
                seq,
                op,
                path: path.clone(),
                size,
                enqueued,
                captured_us,
            },
        );
        Ok(())
    }

    /// Drops the oldest segments whose delete is queued too, until `need` more bytes fit.
    fn evict_expired(&self, st: &mut State, need: u64) {
        while st.bytes + need > self.max_bytes {
            let victim = st.entries.values().find_map(|e| {
                if e.op != Op::Put(ObjectKind::Segment) || st.in_flight.contains(&e.seq) {
                    return None;
                }
                st.entries
                    .values()
                    .find(|d| matches!(d.op, Op::Delete { .. }) && d.path == e.path)
                    .map(|d| (e.seq, d.seq))
            });
            let Some((put, delete)) = victim else {
                return;
            };
            tracing::warn!(
                path = %st.entries[&put].path,
                "spool full: dropping an expired segment that was never uploaded"
            );
            st.dropped += 1;
            metrics::counter!("tern_packager_spool_dropped_total").increment(1);
            self.remove(st, put);
            self.remove(st, delete);
        }
    }

    fn remove(&self, st: &mut State, seq: u64) {
        if let Some(e) = st.entries.remove(&seq) {
            st.bytes -= e.size;
            if let Err(err) = fs::remove_file(self.file(seq)) {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(seq, "removing spool entry: {err}");
                }
            }
        }
    }

    /// The oldest entry that may be uploaded now, beside those already in flight (see the
    /// ordering rules), marked in flight. One pass over the queue.
    pub fn next_ready(&self) -> Option<Entry> {
        let mut st = self.lock();
        // Newest pending playlist per folder, for the deletes' rule.
        let mut newest_playlist: HashMap<&str, u64> = HashMap::new();
        for e in st.entries.values().filter(|e| e.is_playlist()) {
            newest_playlist.insert(e.folder(), e.seq);
        }
        // Paths and folders with pending entries, among those scanned so far (earlier ones).
        let mut paths: HashSet<&str> = HashSet::new();
        let mut media_folders: HashSet<&str> = HashSet::new();
        let mut found = None;
        for e in st.entries.values() {
            let ready = !st.in_flight.contains(&e.seq)
                && !paths.contains(e.path.as_str())
                && match e.op {
                    Op::Put(ObjectKind::MediaPlaylist | ObjectKind::MasterPlaylist) => {
                        !media_folders.contains(e.folder())
                    }
                    Op::Put(ObjectKind::Segment | ObjectKind::InitSegment) => true,
                    Op::Delete { after_playlist } => newest_playlist
                        .get(e.folder())
                        .is_none_or(|newest| *newest < after_playlist),
                };
            if ready {
                found = Some(e.clone());
                break;
            }
            paths.insert(&e.path);
            if e.is_media() {
                media_folders.insert(e.folder());
            }
        }
        if let Some(e) = &found {
            st.in_flight.insert(e.seq);
        }
        found
    }

    /// Reads the body of an entry.
    pub fn body(&self, entry: &Entry) -> Result<Bytes, Error> {
        let path = self.file(entry.seq);
        let raw = fs::read(&path).map_err(io_error(&path))?;
        let start = raw
            .iter()
            .position(|b| *b == b'\n')
            .map_or(raw.len(), |i| i + 1);
        Ok(Bytes::from(raw).slice(start..))
    }

    /// An in-flight entry is done: remove it.
    pub fn complete(&self, seq: u64) {
        let mut st = self.lock();
        st.in_flight.remove(&seq);
        self.remove(&mut st, seq);
    }

    /// An in-flight entry was not uploaded (shutting down): leave it queued.
    pub fn release(&self, seq: u64) {
        self.lock().in_flight.remove(&seq);
    }

    /// Entries handed out by [`Spool::next_ready`] and not yet completed or released.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Entries queued.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Segments dropped because the spool was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// How long the oldest queued entry has waited (zero when empty).
    pub fn lag(&self) -> Duration {
        let st = self.lock();
        st.entries
            .values()
            .next()
            .and_then(|e| SystemTime::now().duration_since(e.enqueued).ok())
            .unwrap_or_default()
    }
}

/// `tern-spool-2 {enqueued ms} {captured µs or -} {put KIND | delete SEQ} {path}`; version 1
/// (no capture time) is still read, so an upgrade resumes an old spool.
fn header_line(op: &Op, path: &str, enqueued: SystemTime, captured_us: Option<u64>) -> String {
    let ms = enqueued
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let captured = captured_us.map_or_else(|| "-".to_owned(), |us| us.to_string());
    let op = match op {
        Op::Put(kind) => format!("put {}", kind.tag()),
        Op::Delete { after_playlist } => format!("delete {after_playlist}"),
    };
    // Object paths come from the packager: no newlines.
    format!("tern-spool-2 {ms} {captured} {op} {path}\n")
}

fn read_header(path: &Path, seq: u64) -> io::Result<Entry> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, "bad spool header");
    let raw = fs::read(path)?;
    let end = raw.iter().position(|b| *b == b'\n').ok_or_else(invalid)?;
    let line = std::str::from_utf8(&raw[..end]).map_err(|_| invalid())?;
    let (version, rest) = line.split_once(' ').ok_or_else(invalid)?;
    let mut parts = match version {
        "tern-spool-1" => rest.splitn(4, ' '),
        "tern-spool-2" => rest.splitn(5, ' '),
        _ => return Err(invalid()),
    };
    let ms: u64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(invalid)?;
    let captured_us = match version {
        "tern-spool-2" => match parts.next().ok_or_else(invalid)? {
            "-" => None,
            us => Some(us.parse().map_err(|_| invalid())?),
        },
        _ => None,
    };
    let op = match (parts.next(), parts.next()) {
        (Some("put"), Some(tag)) => Op::Put(ObjectKind::from_tag(tag).ok_or_else(invalid)?),
        (Some("delete"), Some(n)) => Op::Delete {
            after_playlist: n.parse().map_err(|_| invalid())?,
        },
        _ => return Err(invalid()),
    };
    let object = parts.next().filter(|p| !p.is_empty()).ok_or_else(invalid)?;
    Ok(Entry {
        seq,
        op,
        path: object.to_owned(),
        size: raw.len() as u64,
        enqueued: UNIX_EPOCH + Duration::from_millis(ms),
        captured_us,
    })
}

#[cfg(test)]
mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tern-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn put(path: &str, kind: ObjectKind, body: &'static [u8]) -> Command {
        Command::Put {
            path: path.into(),
            body: Bytes::from_static(body),
            kind,
            captured_us: (kind == ObjectKind::Segment).then_some(1_700_000_000_123_456),
        }
    }

    fn seg(path: &str) -> Command {
        put(path, ObjectKind::Segment, b"0123456789")
    }

    fn pl(path: &str, body: &'static [u8]) -> Command {
        put(path, ObjectKind::MediaPlaylist, body)
    }

    fn del(path: &str) -> Command {
        Command::Delete { path: path.into() }
    }

    /// Uploads everything the spool lets out, recording the order.
    fn drain(s: &Spool) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = s.next_ready() {
            let tag = match e.op {
                Op::Delete { .. } => format!("-{}", e.path),
                Op::Put(_) => format!(
                    "{}={}",
                    e.path,
                    String::from_utf8(s.body(&e).unwrap().to_vec()).unwrap()
                ),
            };
            out.push(tag);
            s.complete(e.seq);
        }
        out
    }

    #[test]
    fn newer_playlists_supersede_queued_ones_and_order_holds() {
        let d = dir("order");
        let s = Spool::open(&d, 1 << 20).unwrap();
        s.append(&seg("a/1.m4s")).unwrap();
        s.append(&pl("a/index.m3u8", b"p1")).unwrap();
        s.append(&seg("a/2.m4s")).unwrap();
        s.append(&pl("a/index.m3u8", b"p2")).unwrap();
        s.append(&del("a/0.m4s")).unwrap();
        s.append(&seg("a/3.m4s")).unwrap();
        s.append(&pl("a/index.m3u8", b"p3")).unwrap();
        assert_eq!(s.len(), 5, "two older playlists were dropped");
        let order = drain(&s);
        assert_eq!(
            order,
            [
                "a/1.m4s=0123456789",
                "a/2.m4s=0123456789",
                "a/3.m4s=0123456789",
                "a/index.m3u8=p3",
                // The delete waited for a playlist that no longer names 0.m4s.
                "-a/0.m4s",
            ]
        );
        assert_eq!(s.bytes(), 0);
        assert!(fs::read_dir(&d).unwrap().next().is_none(), "no files left");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn in_flight_playlist_is_not_superseded_and_delete_waits_for_it() {
        let d = dir("inflight");
        let s = Spool::open(&d, 1 << 20).unwrap();
        s.append(&pl("a/index.m3u8", b"p1")).unwrap();
        s.append(&del("a/0.m4s")).unwrap();
        let first = s.next_ready().unwrap();
        assert_eq!(first.path, "a/index.m3u8");
        assert!(
            s.next_ready().is_none(),
            "the delete waits for the playlist in flight"
        );
        s.append(&pl("a/index.m3u8", b"p2")).unwrap();
        assert!(
            s.next_ready().is_none(),
            "one write per object at a time: p2 waits for p1"
        );
        s.complete(first.seq);
        // The delete waits while a playlist of its folder at or after the one it followed is
        // queued: conservative, never wrong.
        assert_eq!(drain(&s), ["a/index.m3u8=p2", "-a/0.m4s"]);
        fs::remove_dir_all(&d).unwrap();
    }

    /// Takes every entry that may go out now, completing none.
    fn take_ready(s: &Spool) -> Vec<Entry> {
        std::iter::from_fn(|| s.next_ready()).collect()
    }

    fn paths(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn independent_entries_go_out_together_and_dependent_ones_wait() {
        let d = dir("parallel");
        let s = Spool::open(&d, 1 << 20).unwrap();
        s.append(&put("64k/init.mp4", ObjectKind::InitSegment, b"i"))
            .unwrap();
        s.append(&put("master.m3u8", ObjectKind::MasterPlaylist, b"m"))
            .unwrap();
        s.append(&seg("64k/1.m4s")).unwrap();
        s.append(&pl("64k/index.m3u8", b"a1")).unwrap();
        s.append(&seg("128k/1.m4s")).unwrap();
        s.append(&pl("128k/index.m3u8", b"b1")).unwrap();
        s.append(&del("64k/0.m4s")).unwrap();
        s.append(&seg("64k/2.m4s")).unwrap();
        // Everything but the playlists naming pending segments and the delete waiting for them.
        let taken = take_ready(&s);
        assert_eq!(
            paths(&taken),
            [
                "64k/init.mp4",
                "master.m3u8",
                "64k/1.m4s",
                "128k/1.m4s",
                "64k/2.m4s"
            ]
        );
        assert_eq!(s.in_flight(), 5);
        // The 128k segment is stored: its playlist may go; the 64k one still waits.
        s.complete(taken[3].seq);
        let b1 = take_ready(&s);
        assert_eq!(paths(&b1), ["128k/index.m3u8"]);
        s.complete(b1[0].seq);
        s.complete(taken[1].seq);
        s.complete(taken[0].seq);
        s.complete(taken[2].seq);
        // The first 64k playlist names 1.m4s only: it goes although 2.m4s is in flight.
        let a1 = s.next_ready().unwrap();
        assert_eq!(a1.path, "64k/index.m3u8");
        // A newer playlist for the same path waits for the one in flight and for 2.m4s; the
        // delete waits for the playlists (the one queued before it, and anything newer).
        s.append(&pl("64k/index.m3u8", b"a2")).unwrap();
        assert!(s.next_ready().is_none());
        s.complete(a1.seq);
        assert!(s.next_ready().is_none(), "2.m4s is still in flight");
        s.complete(taken[4].seq);
        let a2 = s.next_ready().unwrap();
        assert_eq!(
            String::from_utf8(s.body(&a2).unwrap().to_vec()).unwrap(),
            "a2"
        );
        assert!(s.next_ready().is_none());
        s.complete(a2.seq);
        let delete = take_ready(&s);
        assert_eq!(paths(&delete), ["64k/0.m4s"]);
        // A released entry (shutdown) is handed out again.
        s.release(delete[0].seq);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(drain(&s), ["-64k/0.m4s"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn capture_times_survive_a_restart_and_old_headers_still_load() {
        let d = dir("headers");
        {
            let s = Spool::open(&d, 1 << 20).unwrap();
            s.append(&seg("a/1.m4s")).unwrap();
            s.append(&pl("a/index.m3u8", b"p")).unwrap();
        }
        // An entry written by a version-1 spool (before capture times).
        fs::write(
            d.join(format!("{:020}.{SUFFIX}", 7)),
            b"tern-spool-1 1700000000000 put segment a/2.m4s\nbody",
        )
        .unwrap();
        let s = Spool::open(&d, 1 << 20).unwrap();
        let all = take_ready(&s);
        assert_eq!(paths(&all), ["a/1.m4s", "a/2.m4s"]);
        assert_eq!(all[0].captured_us, Some(1_700_000_000_123_456));
        assert_eq!(all[1].captured_us, None);
        assert_eq!(
            String::from_utf8(s.body(&all[1]).unwrap().to_vec()).unwrap(),
            "body"
        );
        for e in &all {
            s.complete(e.seq);
        }
        assert_eq!(drain(&s), ["a/index.m3u8=p"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_restart_resumes_in_order_and_cleans_temporary_files() {
        let d = dir("resume");
        {
            let s = Spool::open(&d, 1 << 20).unwrap();
            s.append(&seg("a/1.m4s")).unwrap();
            s.append(&pl("a/index.m3u8", b"p1")).unwrap();
            s.append(&del("a/0.m4s")).unwrap();
            // Taken but not completed: a crash mid-upload.
            let e = s.next_ready().unwrap();
            assert_eq!(e.path, "a/1.m4s");
        }
        fs::write(d.join(".00000000000000000009.tmp"), b"half").unwrap();
        let s = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(s.len(), 3);
        s.append(&seg("a/2.m4s")).unwrap();
        assert_eq!(
            drain(&s),
            [
                "a/1.m4s=0123456789",
                "a/index.m3u8=p1",
                "-a/0.m4s",
                "a/2.m4s=0123456789"
            ]
        );
        assert!(!d.join(".00000000000000000009.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn full_spool_evicts_expired_segments_first_then_refuses() {
        let d = dir("full");
        // Entries are 74 (segment), 53 (playlist) and 46 (delete) bytes: room for 4 of them.
        let s = Spool::open(&d, 300).unwrap();
        s.append(&seg("a/0.m4s")).unwrap();
        s.append(&seg("a/1.m4s")).unwrap();
        s.append(&pl("a/index.m3u8", b"p")).unwrap();
        s.append(&del("a/0.m4s")).unwrap();
        // 0.m4s is expired (its delete is queued): dropping it makes room for 2.m4s.
        s.append(&seg("a/2.m4s")).unwrap();
        s.append(&seg("a/3.m4s")).unwrap();
        assert_eq!(s.dropped(), 1);
        assert!(matches!(
            s.append(&seg("a/4.m4s")),
            Err(Error::SpoolFull { .. })
        ));
        assert_eq!(s.dropped(), 2);
        let order = drain(&s);
        assert!(!order.iter().any(|o| o.contains("0.m4s")), "{order:?}");
        assert!(order.contains(&"a/3.m4s=0123456789".to_owned()));
        fs::remove_dir_all(&d).unwrap();
    }
}
