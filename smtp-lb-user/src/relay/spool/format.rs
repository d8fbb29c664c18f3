//! The on-disk format: records (header, CRC, payload), their parsing, and
//! the recovery of one segment at start-up (see the module docs of [`super`]).
use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::error;

pub(super) const MAGIC: u32 = 0x3152_4C53;
pub const HEADER: usize = 13;
pub(super) const KIND_MESSAGE: u8 = 1;
pub(super) const KIND_DONE: u8 = 2;
pub(super) const KIND_RETRY: u8 = 3;
pub const ALL: u32 = u32::MAX;

pub type MsgId = u64;

/// Where a message record lives: its segment, the record's place in it,
/// and its body's place inside the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Location {
    pub(super) segment: u64,
    pub(super) record_at: u64,
    pub(super) record_len: u64,
    /// Offset of the body from the start of the record.
    pub(super) body_at: u64,
    pub(super) body_len: u64,
}

/// Retry state as last recorded: attempts made, and when the next is due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryState {
    pub attempts: u32,
    /// Unix time in milliseconds.
    pub next_ms: u64,
}

/// A message as found in the spool at start-up.
#[derive(Debug)]
pub struct Recovered {
    pub id: MsgId,
    pub received_ms: u64,
    pub sender: String,
    pub rcpts: Vec<String>,
    /// Indexes of recipients already delivered or bounced.
    pub done: HashSet<u32>,
    /// Attempts so far and the next one's time; `None` if never deferred.
    pub retry: Option<RetryState>,
    /// Body length in bytes.
    pub size: u64,
    pub(super) location: Location,
}

/// Damage found at start-up.
#[derive(Debug)]
pub struct CorruptReport {
    pub segment: PathBuf,
    pub moved_to: PathBuf,
    pub bad_bytes: u64,
    pub truncated: bool,
}

/// The wall clock in Unix milliseconds (the spool's and the queue's time base).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.seg"))
}

pub fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(kind);
    let len = u32::try_from(payload.len()).expect("record under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.extend_from_slice(&(b.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(&b[..b.len().min(usize::from(u16::MAX))]);
}

/// Encodes a message record; returns it and the body's offset inside it.
pub fn message_record(
    id: MsgId,
    received_ms: u64,
    sender: &str,
    rcpts: &[String],
    body: &[u8],
) -> (Vec<u8>, u64) {
    message_record_head(
        id,
        received_ms,
        sender,
        rcpts,
        body,
        0,
        &crc32fast::Hasher::new(),
    )
}

/// Encodes the start of a message record whose body is `head` followed by
/// `rest_len` more bytes with CRC state `rest_crc` (streamed from
/// [`super::Incoming`]); the writer appends those bytes after it.
pub(super) fn message_record_head(
    id: MsgId,
    received_ms: u64,
    sender: &str,
    rcpts: &[String],
    head: &[u8],
    rest_len: u64,
    rest_crc: &crc32fast::Hasher,
) -> (Vec<u8>, u64) {
    let mut p = Vec::with_capacity(64 + head.len());
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&received_ms.to_le_bytes());
    put_str(&mut p, sender);
    p.extend_from_slice(
        &u32::try_from(rcpts.len())
            .expect("rcpt count")
            .to_le_bytes(),
    );
    for r in rcpts {
        put_str(&mut p, r);
    }
    p.extend_from_slice(&(head.len() as u64 + rest_len).to_le_bytes());
    let body_at = (HEADER + p.len()) as u64;
    p.extend_from_slice(head);
    let len = u32::try_from(p.len() as u64 + rest_len).expect("record under 4 GiB");
    let mut h = crc32fast::Hasher::new();
    h.update(&[KIND_MESSAGE]);
    h.update(&len.to_le_bytes());
    h.update(&p);
    h.combine(rest_crc);
    let mut out = Vec::with_capacity(HEADER + p.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&p);
    (out, body_at)
}

pub(super) struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u16()?;
        String::from_utf8(self.take(usize::from(n))?.to_vec()).ok()
    }
}

/// The payload of a done record: `count = ALL` means the whole message.
pub fn done_record(id: MsgId, rcpts: &[u32], all: bool) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + 4 * rcpts.len());
    p.extend_from_slice(&id.to_le_bytes());
    if all {
        p.extend_from_slice(&ALL.to_le_bytes());
    } else {
        p.extend_from_slice(&(rcpts.len() as u32).to_le_bytes());
        for r in rcpts {
            p.extend_from_slice(&r.to_le_bytes());
        }
    }
    record(KIND_DONE, &p)
}

pub fn retry_record(id: MsgId, retry: RetryState) -> Vec<u8> {
    let mut p = Vec::with_capacity(20);
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&retry.attempts.to_le_bytes());
    p.extend_from_slice(&retry.next_ms.to_le_bytes());
    record(KIND_RETRY, &p)
}

/// A record that passed its header and CRC checks.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Message {
        id: MsgId,
        received_ms: u64,
        sender: String,
        rcpts: Vec<String>,
        body_offset: u64,
        body_len: u64,
    },
    Done {
        id: MsgId,
        rcpts: Vec<u32>,
    },
    Retry {
        id: MsgId,
        retry: RetryState,
    },
}

/// Parses the record at `pos`; `None` if it is torn, corrupt or unknown.
pub fn parse_record(data: &[u8], pos: usize) -> Option<(Parsed, usize)> {
    let h = data.get(pos..pos + HEADER)?;
    if u32::from_le_bytes(h[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let kind = h[4];
    let len = u32::from_le_bytes(h[5..9].try_into().ok()?);
    let crc = u32::from_le_bytes(h[9..13].try_into().ok()?);
    let payload = data.get(pos + HEADER..pos + HEADER + len as usize)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    let mut c = Cursor(payload);
    let parsed = match kind {
        KIND_MESSAGE => {
            let id = c.u64()?;
            let received_ms = c.u64()?;
            let sender = c.string()?;
            let n = c.u32()?;
            let rcpts = (0..n).map(|_| c.string()).collect::<Option<Vec<_>>>()?;
            let body_len = c.u64()?;
            let body_offset = (pos + HEADER + payload.len() - c.0.len()) as u64;
            if c.0.len() as u64 != body_len {
                return None;
            }
            Parsed::Message {
                id,
                received_ms,
                sender,
                rcpts,
                body_offset,
                body_len,
            }
        }
        KIND_DONE => {
            let id = c.u64()?;
            let n = c.u32()?;
            let rcpts = if n == ALL {
                vec![ALL]
            } else {
                (0..n).map(|_| c.u32()).collect::<Option<Vec<_>>>()?
            };
            Parsed::Done { id, rcpts }
        }
        KIND_RETRY => Parsed::Retry {
            id: c.u64()?,
            retry: RetryState {
                attempts: c.u32()?,
                next_ms: c.u64()?,
            },
        },
        _ => return None,
    };
    Some((parsed, pos + HEADER + len as usize))
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What one segment says, record by record, in order; [`super::Spool::open`]
/// applies the segments in order, so a later copy (compaction) wins.
pub(super) enum Event {
    Message(Recovered),
    Done { id: MsgId, rcpts: Vec<u32> },
    Retry { id: MsgId, retry: RetryState },
}

/// Reads one segment: its records as events, and the damage found (the
/// segment is then copied to `corrupt/` and a torn tail cut off).
pub(super) fn recover_segment(
    dir: &Path,
    path: &Path,
    segment: u64,
) -> io::Result<(Vec<Event>, Option<CorruptReport>)> {
    let data = std::fs::read(path)?;
    // The writer keeps the segment ahead of its records in zeros (its
    // `ZERO_AHEAD`): where a record fails to parse and only zeros follow,
    // the segment ends.
    let zeros_from = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut events = Vec::new();
    let mut bad_bytes = 0u64;
    let mut good_end = 0;
    let mut pos = 0;
    while pos < data.len() {
        if let Some((rec, next)) = parse_record(&data, pos) {
            events.push(match rec {
                Parsed::Message {
                    id,
                    received_ms,
                    sender,
                    rcpts,
                    body_offset,
                    body_len,
                } => Event::Message(Recovered {
                    id,
                    received_ms,
                    sender,
                    rcpts,
                    done: HashSet::new(),
                    retry: None,
                    size: body_len,
                    location: Location {
                        segment,
                        record_at: pos as u64,
                        record_len: (next - pos) as u64,
                        body_at: body_offset - pos as u64,
                        body_len,
                    },
                }),
                Parsed::Done { id, rcpts } => Event::Done { id, rcpts },
                Parsed::Retry { id, retry } => Event::Retry { id, retry },
            });
            pos = next;
            good_end = pos;
            continue;
        }
        if pos >= zeros_from {
            break;
        }
        // Resynchronise: the next offset where a whole valid record starts.
        let start = pos;
        pos += 1;
        while pos < zeros_from && parse_record(&data, pos).is_none() {
            pos += 1;
        }
        bad_bytes += (pos - start) as u64;
    }
    // A torn tail or the writer's zeros: cut off (after the copy below), as
    // done records may be appended to this segment.
    let truncated = good_end < data.len();
    let mut report = None;
    if bad_bytes > 0 {
        let corrupt = dir.join("corrupt");
        std::fs::create_dir_all(&corrupt)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let moved_to = corrupt.join(format!("{name}.{}", now_ms()));
        std::fs::write(&moved_to, &data)?;
        File::open(&moved_to)?.sync_all()?;
        sync_dir(&corrupt)?;
        error!(
            segment = %path.display(), moved_to = %moved_to.display(), bad_bytes, truncated,
            "corrupt spool data: copy moved aside, unreadable records skipped (never delivered)"
        );
        report = Some(CorruptReport {
            segment: path.to_owned(),
            moved_to,
            bad_bytes,
            truncated,
        });
    }
    if truncated {
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(good_end as u64)?;
    }
    Ok((events, report))
}
