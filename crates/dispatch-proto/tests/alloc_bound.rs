//! Decoding hostile bytes never allocates much more than the frame itself: a global allocator
//! records the peak number of live bytes while the decoder runs.

use dispatch_proto::{
    FrameLimit, MAX_REQUEST_FRAME, RequestEnvelope, ResponseEnvelope, decode, read_frame,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

// SAFETY: delegates every call to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn peak_during(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

/// Deterministic pseudo-random bytes (xorshift), so the test needs no extra dependency.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn decoding_hostile_bodies_allocates_at_most_the_frame_limit() {
    let _guard = SERIAL.lock().unwrap();
    let mut worst = 0;
    for seed in 0..20_000u64 {
        let mut body = noise(seed, (seed % 300) as usize + 1);
        // Lengths that claim enormous strings and sequences.
        if seed % 3 == 0 {
            body.splice(1..1, [0xff, 0xff, 0xff, 0xff, 0x0f]);
        }
        let peak = peak_during(|| {
            let _ = decode::<RequestEnvelope>(&body);
            let _ = decode::<ResponseEnvelope>(&body);
        });
        worst = worst.max(peak);
    }
    println!("worst peak allocation while decoding hostile bodies: {worst} bytes");
    assert!(
        worst <= MAX_REQUEST_FRAME as usize,
        "peak {worst} bytes exceeds the frame limit"
    );
}

#[test]
fn hostile_length_prefix_allocates_nothing_large() {
    let _guard = SERIAL.lock().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let peak = peak_during(|| {
        rt.block_on(async {
            let mut reader: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
            let _ = read_frame::<RequestEnvelope, _>(&mut reader, FrameLimit::REQUEST).await;
        })
    });
    println!("peak allocation for a 4 GiB length prefix: {peak} bytes");
    assert!(
        peak < 4096,
        "a hostile prefix made the reader allocate {peak} bytes"
    );
}
