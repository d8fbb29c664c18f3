//! A message body being received: in memory up to [`SPILL`] bytes, then
//! streamed to an unlinked file under `incoming/`, so a session holds at
//! most that much of its message whatever the message's size. The writer
//! thread copies the file into the segment (kernel to kernel where it can).
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// Bytes of a message kept in memory before it goes to disk.
pub const SPILL: usize = 256 * 1024;

pub struct Incoming {
    path: PathBuf,
    file: Option<Arc<File>>,
    /// Bytes already in the file.
    spilled: u64,
    /// Bytes after them, still in memory.
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    _receiving: Receiving,
}

/// Counts a body being received until it is handed to the writer, which
/// waits a moment for such bodies before an `fdatasync` (see `COMMIT_DELAY`).
pub(super) struct Receiving(Arc<AtomicUsize>);

impl Receiving {
    pub(super) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the writer thread appends for an [`Incoming`]: the file's first
/// `len` bytes, then `tail`.
pub(super) struct Spilled {
    pub(super) file: Option<(Arc<File>, u64)>,
    pub(super) tail: Vec<u8>,
}

impl Incoming {
    pub(super) fn new(path: PathBuf, receiving: Receiving) -> Self {
        Self {
            _receiving: receiving,
            path,
            file: None,
            spilled: 0,
            buf: Vec::new(),
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.spilled + self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header section (through its empty line, or all there is) when
    /// the whole body is still in memory: routing reads it from here
    /// rather than from the spool.
    pub fn header_section(&self) -> Option<&[u8]> {
        if self.spilled > 0 {
            return None;
        }
        let end = self
            .buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(self.buf.len(), |at| at + 4);
        Some(&self.buf[..end])
    }

    /// Appends to the body (in memory; [`Self::spill_if_full`] moves it out).
    pub fn extend(&mut self, data: &[u8]) {
        self.crc.update(data);
        self.buf.extend_from_slice(data);
    }

    /// Writes what is in memory to the file once it reaches [`SPILL`],
    /// off the runtime's threads.
    pub async fn spill_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() < SPILL {
            return Ok(());
        }
        let file = if let Some(f) = &self.file {
            f.clone()
        } else {
            let path = self.path.clone();
            let f = tokio::task::spawn_blocking(move || {
                let f = OpenOptions::new()
                    .create_new(true)
                    .read(true)
                    .append(true)
                    .open(&path)?;
                // Unlinked at once: nothing to clean up after a crash,
                // and it was never acknowledged.
                std::fs::remove_file(&path)?;
                Ok::<_, io::Error>(f)
            })
            .await
            .map_err(io::Error::other)??;
            let f = Arc::new(f);
            self.file = Some(f.clone());
            f
        };
        let buf = std::mem::take(&mut self.buf);
        let mut buf = tokio::task::spawn_blocking(move || (&*file).write_all(&buf).map(|()| buf))
            .await
            .map_err(io::Error::other)??;
        self.spilled += buf.len() as u64;
        buf.clear();
        self.buf = buf;
        Ok(())
    }

    /// The whole body in memory (DKIM signing needs it at once).
    pub async fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = match &self.file {
            Some(f) => {
                let (f, n) = (f.clone(), self.spilled);
                tokio::task::spawn_blocking(move || {
                    let mut v = vec![0; usize::try_from(n).map_err(io::Error::other)?];
                    f.read_exact_at(&mut v, 0)?;
                    Ok::<_, io::Error>(v)
                })
                .await
                .map_err(io::Error::other)??
            }
            None => Vec::new(),
        };
        out.extend_from_slice(&self.buf);
        Ok(out)
    }

    pub(super) fn into_parts(self) -> (Spilled, crc32fast::Hasher, u64) {
        let len = self.len();
        (
            Spilled {
                file: self.file.map(|f| (f, self.spilled)),
                tail: self.buf,
            },
            self.crc,
            len,
        )
    }
}
