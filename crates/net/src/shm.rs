//! Shared memory between a server and the workers on its host: parameters and gradients
//! move through one mapped file instead of the loopback socket, while every request, reply
//! and check still goes over gRPC (but the pulls after a session's first: a worker awaits the
//! next step in the file, [`SharedRegion::wait_newest`]).
//!
//! Over loopback a step's bytes are copied many times: the server's parameters into each
//! worker's socket and out again, each gradient into the socket, out, and into a buffer,
//! with HTTP/2 framing on the way. With the file, the server writes each step's parameters
//! once and every worker on the host copies them out, or, if it stops overtaken work, computes
//! on them where they lie ([`ParamsView`]); a worker computes its gradient straight into its
//! slot ([`GradientWrite`]) and the server adds it to the step's sum from there
//! ([`GradientRead`]), with no copy on either side. The file's header also says the newest
//! step published ([`SharedRegion::newest`]), which such a worker asks as it computes, and a
//! word the server bumps at every publication, on which the thread that computes a worker's
//! next gradient sleeps until its step is out (a futex: no pull, no hop through the async
//! runtime). What travels over gRPC is a push with no values, flagged `shm` (the values are
//! in the file), and a session's first pull's answer.
//!
//! The file (under `/dev/shm`, mode 0600, removed when the server ends) holds `param_slots`
//! slots for parameters (step `s` in slot `s % param_slots`) and one slot per worker for its
//! gradient. Every slot is a sequence lock: its writer makes the sequence odd, writes, and
//! makes it even again; a worker copies parameters out and keeps them only if the sequence
//! was even and unchanged across its copy (else the slot was rewritten under it: the worker
//! pulls over gRPC instead). A gradient slot is also a lock between its worker and the server:
//! the worker starts a write only on an even sequence the server is not reading (else it
//! computes into a buffer and sends the values over gRPC), and the server reads a gradient in
//! place only on the sequence the push names, marking it read meanwhile (else it refuses the
//! push), so no write lands in a gradient while the server adds it up. A worker learns the
//! file's path and a random nonce in the join reply and uses the file only if it can open it
//! and finds the nonce inside: a worker on another host finds no such file, and falls back to
//! gRPC.

use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Identifies a quorum shared-memory file ("QUORUMSM").
const MAGIC: u64 = u64::from_le_bytes(*b"QUORUMSM");
/// The layout's version; a file of another version is not used. (2: gradient slots are read
/// in place under [`READING`]; 3: the header's [`PUBLISHED`] word, which workers wait on.)
const VERSION: u64 = 3;
/// Bytes of the file's header and of each slot's header (a cache line each).
const HEADER: usize = 64;
/// Parameter slots: a worker's copy of step `s` is spoiled only if the server publishes
/// `s + PARAM_SLOTS` while it copies.
pub const PARAM_SLOTS: usize = 4;
/// The header's word holding the newest published step + 1 (0: none yet); the words before
/// it say what the file is.
const NEWEST: usize = 6;
/// The header's word counting the server's publications (and its "stop"), in its lower 32 bits:
/// a worker waiting for a step sleeps on it ([`SharedRegion::wait_newest`]), the server wakes
/// every such worker when it changes.
const PUBLISHED: usize = 7;
/// The longest a waiting worker sleeps before it asks again whether to go on waiting.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(20);
/// The bit of a gradient slot's sequence number the server sets while it reads the values in
/// place ([`GradientRead`]); a worker starts no write meanwhile.
const READING: u64 = 1 << 63;
/// The step word of a gradient slot whose write was given up: no push names it.
const NO_STEP: u64 = u64::MAX;
/// File names start with this, then the owning server's process id.
const PREFIX: &str = "quorum-";

/// Why a slot's values could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The writer rewrote the slot while it was read (or is writing it now).
    #[error("the values were rewritten while they were read")]
    Rewritten,
    /// The slot holds another step's values, or another push's.
    #[error("the slot holds other values than the ones asked for")]
    Other,
}

/// A mapped shared-memory file: the server's own (created, removed on drop) or a worker's view.
pub struct SharedRegion {
    map: memmap2::MmapRaw,
    path: PathBuf,
    owner: bool,
    nonce: u64,
    len: usize,
    param_slots: usize,
    gradient_slots: usize,
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion").field("path", &self.path).field("len", &self.len).finish()
    }
}

/// Bytes of one slot holding `len` values, header included, rounded to a cache line.
fn slot_bytes(len: usize) -> usize {
    (HEADER + 4 * len).div_ceil(HEADER) * HEADER
}

fn file_bytes(len: usize, slots: usize) -> usize {
    HEADER + slots * slot_bytes(len)
}

impl SharedRegion {
    /// Creates the file for a server of `len` values and `workers` workers, in `/dev/shm`
    /// where there is one (else the temporary directory), first removing files left by
    /// servers that died without removing theirs.
    pub fn create(len: usize, workers: usize) -> std::io::Result<Self> {
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() { dir.to_path_buf() } else { std::env::temp_dir() };
        remove_abandoned(&dir);
        let nonce: u64 = rand::random();
        let path = dir.join(format!("{PREFIX}{}-{nonce:016x}", std::process::id()));
        let mut open = std::fs::OpenOptions::new();
        open.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
        let file = open.open(&path)?;
        let slots = PARAM_SLOTS + workers;
        let mapped = reserve(&file, file_bytes(len, slots)).and_then(|()| memmap2::MmapRaw::map_raw(&file));
        let map = match mapped {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let region =
            SharedRegion { map, path, owner: true, nonce, len, param_slots: PARAM_SLOTS, gradient_slots: workers };
        for (i, v) in [MAGIC, VERSION, nonce, PARAM_SLOTS as u64, workers as u64, len as u64].into_iter().enumerate() {
            region.word(0, i).store(v, Ordering::Relaxed);
        }
        Ok(region)
    }

    /// Opens a server's file as worker `worker` of a model of `len` values: `Err` says why
    /// it cannot be used (not on this host, another run's, another model's).
    pub fn open(path: &str, nonce: u64, len: usize, worker: u32) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| format!("{path}: {e}"))?;
        let size = file.metadata().map_err(|e| e.to_string())?.len() as usize;
        if size < HEADER {
            return Err(format!("{path} is too short to be a quorum shared-memory file"));
        }
        let map = memmap2::MmapRaw::map_raw(&file).map_err(|e| format!("mapping {path}: {e}"))?;
        let mut region =
            SharedRegion { map, path: path.into(), owner: false, nonce, len, param_slots: 0, gradient_slots: 0 };
        let h: Vec<u64> = (0..6).map(|i| region.word(0, i).load(Ordering::Acquire)).collect();
        if h[0] != MAGIC || h[1] != VERSION || h[2] != nonce {
            return Err(format!("{path} is not this server's shared-memory file (another run's, or another host's)"));
        }
        if h[5] != len as u64 {
            return Err(format!("{path} holds {} values per slot, not {len}", h[5]));
        }
        (region.param_slots, region.gradient_slots) = (h[3] as usize, h[4] as usize);
        if worker as usize >= region.gradient_slots
            || size < file_bytes(len, region.param_slots + region.gradient_slots)
        {
            return Err(format!("{path} has no gradient slot for worker {worker}"));
        }
        // A write left half-done by this index's previous process (killed while it computed)
        // would keep the slot from ever being written again: the server gives an index to a new
        // process only once the last one went silent, so the slot is this process's now.
        let at = region.slot_at(region.gradient_slot(worker));
        let seq = region.word(at, 0).load(Ordering::Acquire);
        if seq & 1 == 1 {
            region.end(at, seq, NO_STEP);
        }
        Ok(region)
    }

    /// The file's path (for the join reply).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The random number in the file's header that tells a worker it opened the right file.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Values per slot.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether slots hold no values (a model without parameters).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th 8-byte word of the header at byte `at`.
    fn word(&self, at: usize, i: usize) -> &AtomicU64 {
        debug_assert!(at + 8 * (i + 1) <= self.map.len() && i < HEADER / 8);
        // SAFETY: in bounds (the file was sized for every slot before mapping, and `open`
        // checked its size), 8-byte aligned (the map is page-aligned, headers are at multiples
        // of 64), and only ever accessed atomically, by every process.
        unsafe { &*(self.map.as_mut_ptr().add(at + 8 * i) as *const AtomicU64) }
    }

    fn slot_at(&self, slot: usize) -> usize {
        HEADER + slot * slot_bytes(self.len)
    }

    /// Starts a write into the parameter slot at byte `at` (the server is its only writer):
    /// its sequence number made odd (returned).
    fn begin(&self, at: usize) -> u64 {
        let seq = self.word(at, 0);
        let odd = seq.load(Ordering::Relaxed) | 1;
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        odd
    }

    /// Ends the write `odd` began into the slot at byte `at`, of `step`'s values; returns the
    /// slot's new sequence number.
    fn end(&self, at: usize, odd: u64, step: u64) -> u64 {
        self.word(at, 1).store(step, Ordering::Relaxed);
        self.word(at, 0).store(odd + 1, Ordering::Release);
        odd + 1
    }

    /// Copies `slot`'s values into `out` if they are `step`'s and were not rewritten meanwhile.
    fn read(&self, slot: usize, step: u64, out: &mut Vec<f32>) -> Result<(), SlotError> {
        let at = self.slot_at(slot);
        let before = self.word(at, 0).load(Ordering::Acquire);
        if before & 1 == 1 {
            return Err(SlotError::Rewritten);
        }
        if before == 0 || self.word(at, 1).load(Ordering::Relaxed) != step {
            return Err(SlotError::Other);
        }
        out.clear();
        out.reserve(self.len);
        // SAFETY: the data lies in the map; `out` has room for `len` values, which the copy
        // initialises before `set_len`. A concurrent writer can tear the copy: then the
        // sequence number differs below and the values are not used.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(at + HEADER) as *const f32, out.as_mut_ptr(), self.len);
            out.set_len(self.len);
        }
        fence(Ordering::Acquire);
        if self.word(at, 0).load(Ordering::Relaxed) != before {
            return Err(SlotError::Rewritten);
        }
        Ok(())
    }

    /// The server: publishes the parameters of `step`.
    pub fn publish(&self, step: u64, params: &[f32]) {
        assert_eq!(params.len(), self.len, "a slot holds the whole model");
        let at = self.slot_at(step as usize % self.param_slots);
        let odd = self.begin(at);
        // SAFETY: the slot's data lies in the map (sized for it); the server is the only
        // writer of parameter slots. Workers in other processes may copy concurrently: they
        // discard what they copied unless the sequence number was even and unchanged across
        // the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(params.as_ptr(), self.map.as_mut_ptr().add(at + HEADER) as *mut f32, self.len)
        };
        self.end(at, odd, step);
        self.word(0, NEWEST).fetch_max(step + 1, Ordering::Release);
        self.wake_waiters();
    }

    /// The lower half of the [`PUBLISHED`] word, the one waiting workers sleep on.
    fn published(&self) -> &AtomicU32 {
        // SAFETY: in bounds and aligned as `word` says (4 bytes at the start of an 8-byte
        // word); that word is only ever accessed through this view, atomically, by every
        // process.
        unsafe { &*(self.word(0, PUBLISHED) as *const AtomicU64 as *const AtomicU32) }
    }

    /// The server: a publication (or "stop") is made: counted, and every waiting worker woken.
    fn wake_waiters(&self) {
        self.published().fetch_add(1, Ordering::Release);
        futex::wake_all(self.published());
    }

    /// A worker: the newest published step once it is at least `min_step` (at once if it is);
    /// `None` as soon as `give_up()` says so, asked at least every 20 ms while it waits. The
    /// thread sleeps meanwhile, and wakes when the server publishes: the worker's computing
    /// thread itself waits here, so a step's parameters set it computing without a hop through
    /// any other thread. After [`SharedRegion::close_all`] every step reads as published.
    pub fn wait_newest(&self, min_step: u64, give_up: &dyn Fn() -> bool) -> Option<u64> {
        loop {
            // Read the count before the step: a publication after the step was read changes
            // the count, and the wait below returns at once.
            let seen = self.published().load(Ordering::Acquire);
            if let Some(newest) = self.newest().filter(|&n| n >= min_step) {
                return Some(newest);
            }
            if give_up() {
                return None;
            }
            futex::wait(self.published(), seen, WAIT_SLICE);
        }
    }

    /// Whether the server has stopped ([`SharedRegion::close_all`]).
    pub fn is_closed(&self) -> bool {
        self.word(0, NEWEST).load(Ordering::Acquire) == u64::MAX
    }

    /// The newest step whose parameters the server has published (`None` before the first):
    /// one atomic read, cheap enough to ask between the layers of a gradient computation
    /// whether the step it is for has closed.
    pub fn newest(&self) -> Option<u64> {
        self.word(0, NEWEST).load(Ordering::Acquire).checked_sub(1)
    }

    /// The server, stopping: every step is closed, so [`SharedRegion::newest`] reads later than
    /// any step a worker computes on.
    pub fn close_all(&self) {
        self.word(0, NEWEST).store(u64::MAX, Ordering::Release);
        self.wake_waiters();
    }

    /// A worker: copies the parameters of `step` into `out`.
    pub fn read_params(&self, step: u64, out: &mut Vec<f32>) -> Result<(), SlotError> {
        self.read(step as usize % self.param_slots, step, out)
    }

    /// A worker: the parameters of `step` where they lie, not copied ([`ParamsView`]), if the
    /// slot holds them whole now.
    pub fn view_params(self: &Arc<Self>, step: u64) -> Result<ParamsView, SlotError> {
        let at = self.slot_at(step as usize % self.param_slots);
        let seq = self.word(at, 0).load(Ordering::Acquire);
        if seq & 1 == 1 {
            return Err(SlotError::Rewritten);
        }
        if seq == 0 || self.word(at, 1).load(Ordering::Relaxed) != step {
            return Err(SlotError::Other);
        }
        Ok(ParamsView { region: Arc::clone(self), at, seq })
    }

    /// The server: worker `worker`'s gradient of `step`, written as `seq`, where it lies, held
    /// from being rewritten until the returned [`GradientRead`] is dropped.
    pub fn gradient(&self, worker: u32, step: u64, seq: u64) -> Result<GradientRead<'_>, SlotError> {
        if worker as usize >= self.gradient_slots {
            return Err(SlotError::Other);
        }
        let at = self.slot_at(self.gradient_slot(worker));
        let word = self.word(at, 0);
        let now = word.load(Ordering::Acquire);
        if now & 1 == 1 {
            return Err(SlotError::Rewritten);
        }
        if now != seq || self.word(at, 1).load(Ordering::Relaxed) != step {
            return Err(SlotError::Other);
        }
        // The sequence number the push named, unchanged since it was checked (a write would
        // have moved it), now marked read: a worker starts no write until the mark is gone.
        word.compare_exchange(seq, seq | READING, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| SlotError::Rewritten)?;
        Ok(GradientRead { region: self, at, seq })
    }

    /// Worker `worker`: lends its gradient slot to be computed into, so the gradient is
    /// written once, in place, not computed into a buffer and copied ([`GradientWrite`]).
    /// The slot reads as being written (a push naming it is refused) until
    /// [`GradientWrite::finish`]. `None` while the server reads the slot (a push of this index
    /// still being added up, from an earlier process of it): the gradient goes into a buffer.
    pub fn gradient_write(self: &Arc<Self>, worker: u32) -> Option<GradientWrite> {
        let at = self.slot_at(self.gradient_slot(worker));
        let word = self.word(at, 0);
        let now = word.load(Ordering::Relaxed);
        if now & (1 | READING) != 0 {
            return None;
        }
        word.compare_exchange(now, now | 1, Ordering::Acquire, Ordering::Relaxed).ok()?;
        fence(Ordering::Release);
        Some(GradientWrite { region: Arc::clone(self), at, odd: now | 1 })
    }

    fn gradient_slot(&self, worker: u32) -> usize {
        assert!((worker as usize) < self.gradient_slots, "worker {worker} has no gradient slot");
        self.param_slots + worker as usize
    }
}

/// A worker's gradient slot lent for one gradient ([`SharedRegion::gradient_write`]): the
/// values to write every one of, then [`GradientWrite::finish`] with the step they are for.
/// Holds the mapping, so it can travel to the thread that computes.
pub struct GradientWrite {
    region: Arc<SharedRegion>,
    at: usize,
    odd: u64,
}

impl GradientWrite {
    /// Values in the slot (the model's).
    pub fn len(&self) -> usize {
        self.region.len
    }

    /// Whether the slot holds no values (a model without parameters).
    pub fn is_empty(&self) -> bool {
        self.region.len == 0
    }

    /// The slot's values (the model's length), to be overwritten.
    pub fn values(&mut self) -> &mut [f32] {
        // SAFETY: the slot's data lies in the map (sized for it) and is 4-byte aligned (the
        // map is page-aligned, slots and headers are multiples of 64 bytes). This process is
        // the slot's only writer, and a worker lends its slot to one computation at a time
        // (`&mut self` for as long as the slice lives). Any value is a valid `f32`. The server,
        // in another process, reads the slot only when a push names a finished write, and this
        // write began only while it did not (`gradient_write`).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.region.map.as_mut_ptr().add(self.at + HEADER) as *mut f32,
                self.region.len,
            )
        }
    }

    /// Ends the write: the values are `step`'s. The push names the returned sequence number.
    pub fn finish(mut self, step: u64) -> u64 {
        let seq = self.region.end(self.at, self.odd, step);
        self.odd = 0;
        seq
    }
}

impl Drop for GradientWrite {
    /// A write given up (the computation abandoned or failed): the slot is writable again and
    /// holds no step's gradient.
    fn drop(&mut self) {
        if self.odd != 0 {
            self.region.end(self.at, self.odd, NO_STEP);
        }
    }
}

/// A worker's gradient read where it lies ([`SharedRegion::gradient`]): while this lives, the
/// slot is marked read and no write starts in it, so the values stay the pushed ones.
pub struct GradientRead<'a> {
    region: &'a SharedRegion,
    at: usize,
    seq: u64,
}

impl GradientRead<'_> {
    /// The gradient's values (the model's length).
    pub fn values(&self) -> &[f32] {
        // SAFETY: the slot's data lies in the map (sized for it), 4-byte aligned (page-aligned
        // map, slots and headers multiples of 64 bytes), and any bits are a valid `f32`. Its
        // writer finished the write this push names (the sequence number, even, is the one the
        // push named) and starts no other while the READING mark set in `gradient` stays: until
        // this value is dropped, and the slice borrows it, so it cannot outlive the mark.
        unsafe {
            std::slice::from_raw_parts(self.region.map.as_ptr().add(self.at + HEADER) as *const f32, self.region.len)
        }
    }
}

impl Drop for GradientRead<'_> {
    fn drop(&mut self) {
        self.region.word(self.at, 0).store(self.seq, Ordering::Release);
    }
}

/// A step's parameters read where the server wrote them ([`SharedRegion::view_params`]),
/// saving a worker the copy of a model's worth of values per step and the cache a private copy
/// takes. The server rewrites the slot only when it publishes the step `PARAM_SLOTS` later, so
/// a gradient computed on the view is kept only if [`ParamsView::intact`] says, after, that
/// this did not happen meanwhile (the sequence lock of [`SharedRegion::read_params`], held over
/// the whole computation instead of one copy).
pub struct ParamsView {
    region: Arc<SharedRegion>,
    at: usize,
    seq: u64,
}

impl ParamsView {
    /// The values (the model's length). Read-only; what was read is to be trusted only if
    /// [`ParamsView::intact`] says so afterwards.
    pub fn values(&self) -> &[f32] {
        // SAFETY: the slot's data lies in the map (sized for it), 4-byte aligned (page-aligned
        // map, slots and headers multiples of 64 bytes), and any bits are a valid `f32`. This
        // process never writes parameter slots. The server, in another process, may rewrite the
        // slot (publishing a step PARAM_SLOTS later) while it is read, as in the copy of
        // `read`: values read then are plain floats, used only in arithmetic, and whatever is
        // computed from them is thrown away when `intact` sees the sequence number moved.
        unsafe {
            std::slice::from_raw_parts(self.region.map.as_ptr().add(self.at + HEADER) as *const f32, self.region.len)
        }
    }

    /// Whether the slot still holds the values it held when viewed (so everything read
    /// through [`ParamsView::values`] was those values).
    pub fn intact(&self) -> bool {
        fence(Ordering::Acquire);
        self.region.word(self.at, 0).load(Ordering::Relaxed) == self.seq
    }
}

impl std::fmt::Debug for ParamsView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamsView").field("len", &self.region.len).field("seq", &self.seq).finish()
    }
}

impl std::fmt::Debug for GradientWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradientWrite").field("len", &self.region.len).finish()
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Sleeping on a word of the shared memory until another process changes it: Linux's futex
/// (the word is in a shared file mapping, so the wait is not process-private), elsewhere short
/// sleeps.
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word` holds `expected`, at most `limit` (or until any wake, or a signal).
    #[cfg(target_os = "linux")]
    pub(super) fn wait(word: &AtomicU32, expected: u32, limit: Duration) {
        let ts = libc::timespec { tv_sec: limit.as_secs() as libc::time_t, tv_nsec: limit.subsec_nanos() as _ };
        // SAFETY: FUTEX_WAIT reads the aligned 4-byte word (alive for the call: borrowed) and
        // compares it with `expected`; the time-out is a valid timespec on the stack. Any
        // result (woken, time-out, interrupted, the value already changed) is fine: the caller
        // looks again.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec);
        }
    }

    /// Wakes every thread, of any process, sleeping on `word`.
    #[cfg(target_os = "linux")]
    pub(super) fn wake_all(word: &AtomicU32) {
        // SAFETY: FUTEX_WAKE only uses the word's address (aligned, borrowed for the call).
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn wait(word: &AtomicU32, expected: u32, limit: Duration) {
        let _ = (word, expected);
        std::thread::sleep(limit.min(Duration::from_micros(100)));
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn wake_all(_: &AtomicU32) {}
}

/// Sizes the file to `bytes`, with the memory behind it reserved where the system allows: a
/// write into a mapped page that a full `/dev/shm` cannot back would kill the process
/// (SIGBUS); a reservation that does not fit fails here instead, and the server uses gRPC.
fn reserve(file: &std::fs::File, bytes: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
    }
    file.set_len(bytes as u64)
}

/// Removes the files in `dir` of servers that are no longer running (killed before they could
/// remove their own): their process id, in the name, names no live process.
fn remove_abandoned(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return; // No way to tell a live process here: leave them.
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests;
