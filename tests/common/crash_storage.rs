//! Crash-point enumeration's storage, shared by tests/crash.rs, tests/maintenance_crash.rs and
//! tests/maintenance_commit_crash.rs: a file layer that records every write, length change and
//! flush of one or more files in their true order, and the crash images rebuilt from that
//! record at each of its boundaries, with the unflushed changes (a) all lost, (b) a random
//! subset applied in random order, (c) torn at 4 KiB.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use vhost_user_vhdx::vhdx::{MemStorage, Storage};

/// One entry of the record. Files are numbered as their test numbers them; `Mark` is a test's
/// own note between changes (where a workload op started, say) and is no crash point.
#[derive(Clone, Debug)]
pub enum Event<M = ()> {
    Write(usize, u64, Arc<Vec<u8>>),
    SetLen(usize, u64),
    Flush(usize),
    Mark(M),
}

impl<M> Event<M> {
    /// The event in a failure message, without its data.
    pub fn describe(&self) -> String {
        match self {
            Event::Write(f, off, data) => {
                format!("write {} bytes at {off:#x} of file {f}", data.len())
            }
            Event::SetLen(f, len) => format!("set file {f}'s length to {len:#x}"),
            Event::Flush(f) => format!("flush file {f}"),
            Event::Mark(_) => "a mark".into(),
        }
    }
}

/// The record all files of one run share.
pub type Record<M = ()> = Arc<Mutex<Vec<Event<M>>>>;

/// One file's storage in memory; every change goes into the shared record.
pub struct Recorder<M = ()> {
    file: usize,
    mem: MemStorage,
    events: Record<M>,
}

impl<M> Recorder<M> {
    pub fn new(file: usize, initial: Vec<u8>, events: &Record<M>) -> Self {
        Recorder {
            file,
            mem: MemStorage::new(initial),
            events: Arc::clone(events),
        }
    }

    /// A recorder of file 0 with a record of its own.
    pub fn alone(initial: Vec<u8>) -> Self {
        Recorder::new(0, initial, &Arc::new(Mutex::new(Vec::new())))
    }

    pub fn mark(&self, m: M) {
        self.events.lock().unwrap().push(Event::Mark(m));
    }

    /// The record so far.
    pub fn events(&self) -> Vec<Event<M>>
    where
        M: Clone,
    {
        self.events.lock().unwrap().clone()
    }

    /// The file as it is now, every change applied.
    pub fn snapshot(&self) -> Vec<u8> {
        self.mem.snapshot()
    }
}

impl<M: Send + Sync> Storage for Recorder<M> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Recorded under the lock it is applied under, so the record is the true order.
        let mut ev = self.events.lock().unwrap();
        self.mem.write_at(buf, offset)?;
        ev.push(Event::Write(self.file, offset, Arc::new(buf.to_vec())));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.events.lock().unwrap().push(Event::Flush(self.file));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut ev = self.events.lock().unwrap();
        self.mem.set_len(len)?;
        ev.push(Event::SetLen(self.file, len));
        Ok(())
    }
}

/// A crash image: the durable file, shared, with the writes that made it to disk laid over it
/// in 4 KiB pages, so that thousands of images cost no copies of the whole file.
pub struct CrashImage {
    base: Arc<Vec<u8>>,
    state: Mutex<CrashState>,
}

struct CrashState {
    pages: BTreeMap<u64, Box<[u8; 4096]>>,
    len: u64,
    /// Bytes of `base` past this read as zeros (the file was cut shorter).
    base_limit: u64,
}

impl CrashImage {
    pub fn new(base: Arc<Vec<u8>>) -> Self {
        let len = base.len() as u64;
        CrashImage {
            base,
            state: Mutex::new(CrashState {
                pages: Default::default(),
                len,
                base_limit: len,
            }),
        }
    }

    fn page(base: &[u8], st: &CrashState, page: u64) -> [u8; 4096] {
        if let Some(p) = st.pages.get(&page) {
            return **p;
        }
        let mut out = [0u8; 4096];
        let limit = st.base_limit.min(base.len() as u64);
        if page < limit {
            let n = (limit - page).min(4096) as usize;
            out[..n].copy_from_slice(&base[page as usize..page as usize + n]);
        }
        out
    }

    /// Applies a recorded change (a flush or mark changes nothing).
    fn put<M>(&self, e: &Event<M>) {
        match e {
            Event::Write(_, off, data) => self.write_at(data, *off).unwrap(),
            Event::SetLen(_, len) => self.set_len(*len).unwrap(),
            Event::Flush(_) | Event::Mark(_) => {}
        }
    }
}

/// `len` bytes at file offset `offset`, cut at 4 KiB page boundaries: for each piece, where it
/// starts in the buffer, the offset of its page, where it starts in the page, and its length.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let page = pos / 4096 * 4096;
        let within = (pos - page) as usize;
        let n = (4096 - within).min(len - at);
        let piece = (at, page, within, n);
        at += n;
        Some(piece)
    })
}

impl Storage for CrashImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = self.state.lock().unwrap();
        for (at, page, within, n) in pieces(offset, buf.len()) {
            if page + within as u64 >= st.len {
                buf[at..].fill(0);
                break;
            }
            let p = Self::page(&self.base, &st, page);
            buf[at..at + n].copy_from_slice(&p[within..within + n]);
        }
        Ok(buf.len().min(st.len.saturating_sub(offset) as usize))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        for (at, page, within, n) in pieces(offset, buf.len()) {
            let mut p = Self::page(&self.base, &st, page);
            p[within..within + n].copy_from_slice(&buf[at..at + n]);
            st.pages.insert(page, Box::new(p));
        }
        st.len = st.len.max(offset + buf.len() as u64);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        if len < st.len {
            st.base_limit = st.base_limit.min(len);
            let cut = len / 4096 * 4096;
            if len % 4096 != 0 {
                let mut p = Self::page(&self.base, &st, cut);
                p[(len - cut) as usize..].fill(0);
                st.pages.insert(cut, Box::new(p));
            }
            let from = len.div_ceil(4096) * 4096;
            st.pages.retain(|&k, _| k < from);
        }
        st.len = len;
        Ok(())
    }
}

/// Applies a recorded change to a whole file image.
pub fn apply<M>(img: &mut Vec<u8>, e: &Event<M>) {
    match e {
        Event::Write(_, off, data) => {
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        Event::SetLen(_, len) => img.resize(*len as usize, 0),
        Event::Flush(_) | Event::Mark(_) => {}
    }
}

/// Walks the record of files that held `initial` (by file number) when it began. At every
/// write, length change and flush, calls `point(i, variant, images)` with `i` the event's
/// index and the images of all files as a crash just after it would leave them: variant 0 with
/// every unflushed change lost, 1 with a random subset applied in random order, 2 with each
/// unflushed write torn at 4 KiB (and each length change made or not). Variants 1 and 2 are
/// left out while nothing is unflushed.
pub fn for_each_crash_point<M>(
    events: &[Event<M>],
    initial: Vec<Vec<u8>>,
    rng: &mut StdRng,
    mut point: impl FnMut(usize, usize, Vec<CrashImage>),
) {
    let mut durable: Vec<Arc<Vec<u8>>> = initial.into_iter().map(Arc::new).collect();
    let mut pending: Vec<Vec<usize>> = vec![Vec::new(); durable.len()];
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Flush(f) => {
                let d = Arc::make_mut(&mut durable[*f]);
                for &p in &pending[*f] {
                    apply(d, &events[p]);
                }
                pending[*f].clear();
            }
            Event::Write(f, ..) | Event::SetLen(f, _) => pending[*f].push(i),
            Event::Mark(_) => continue,
        }
        for variant in 0..3 {
            if variant > 0 && pending.iter().all(Vec::is_empty) {
                break;
            }
            let images: Vec<CrashImage> = durable
                .iter()
                .map(|d| CrashImage::new(Arc::clone(d)))
                .collect();
            for (img, pending) in images.iter().zip(&pending) {
                match variant {
                    0 => {}
                    1 => {
                        let mut chosen: Vec<usize> = pending
                            .iter()
                            .copied()
                            .filter(|_| rng.gen_bool(0.5))
                            .collect();
                        chosen.shuffle(rng);
                        for p in chosen {
                            img.put(&events[p]);
                        }
                    }
                    _ => {
                        for &p in pending {
                            match &events[p] {
                                Event::Write(_, off, data) => {
                                    for (k, piece) in data.chunks(4096).enumerate() {
                                        if rng.gen_bool(0.5) {
                                            img.write_at(piece, off + (k * 4096) as u64).unwrap();
                                        }
                                    }
                                }
                                other => {
                                    if rng.gen_bool(0.5) {
                                        img.put(other)
                                    }
                                }
                            }
                        }
                    }
                }
            }
            point(i, variant, images);
        }
    }
}

/// What an enumeration found: its crash points, how many recovered, the bytes of flushed data
/// that read wrong, and the first few failures.
#[derive(Default)]
pub struct Outcome {
    pub points: usize,
    pub recovered: usize,
    pub lost: u64,
    pub failures: Vec<String>,
}

impl Outcome {
    /// Counts one crash point and its verdict: `Err((what went wrong, flushed bytes lost))`,
    /// named by `what` in the failure list.
    pub fn count(&mut self, what: impl FnOnce() -> String, verdict: Result<(), (String, u64)>) {
        self.points += 1;
        match verdict {
            Ok(()) => self.recovered += 1,
            Err((msg, lost)) => {
                self.lost += lost;
                if self.failures.len() < 5 {
                    self.failures.push(format!("{}: {msg}", what()));
                }
            }
        }
    }

    /// Prints `{label}crash points: N, recovered: N, flushed bytes lost: N` and panics, with
    /// the first failures, unless every crash point recovered and no flushed byte was lost.
    pub fn assert_all_recovered(&self, label: &str) {
        println!(
            "{label}crash points: {}, recovered: {}, flushed bytes lost: {}",
            self.points, self.recovered, self.lost
        );
        assert!(
            self.failures.is_empty() && self.recovered == self.points && self.lost == 0,
            "{label}{} of {} crash points did not recover; first failures:\n{}",
            self.points - self.recovered,
            self.points,
            self.failures.join("\n")
        );
    }
}
