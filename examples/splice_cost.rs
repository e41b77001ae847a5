//! What would answering reads with `splice` cost instead of slices of the
//! source maps? For the bench's row Q1: a spliced reply takes no page of a
//! map, so the daemon would not pin, fault in or release those pages (19%
//! and 10% of its samples on Q1), but it needs one `splice` call per piece
//! of the reply. This measures that call on a page-cached file: pieces of
//! PIECE_KIB taken every other piece (as a fused gate/up tensor's 8 KiB
//! rows are), from an offset that is not page-aligned (as safetensors data
//! is), 256 KiB at a time into a 1 MiB pipe, which is drained into
//! `/dev/null` (nothing copied there). The figures are in docs/PERFORMANCE.md
//! (where a first read's time goes).
//!
//!     cargo run --release --example splice_cost -- FILE PIECE_KIB [MIB]
//!
//! Read FILE once first (`cat FILE > /dev/null`) so that it is in the page
//! cache. Prints `piece, calls, microseconds per call and per MiB`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, piece, rest @ ..] = args.as_slice() else {
        return Err("usage: splice_cost FILE PIECE_KIB [MIB]".into());
    };
    let piece = piece.parse::<usize>()? << 10;
    let mib = rest.first().map_or(Ok(256), |m| m.parse::<usize>())?;
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    const BATCH: usize = 256 << 10;
    if piece == 0 || piece > BATCH {
        return Err("PIECE_KIB must be 1..256".into());
    }
    let start = 3 * 4096 + 100;
    let total = mib << 20;
    if start + 2 * total > len {
        return Err(format!(
            "{path}: {len} bytes, the run reads {} of it",
            start + 2 * total
        )
        .into());
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let [rd, wr] = fds;
    // SAFETY: plain fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(wr, libc::F_SETPIPE_SZ, 1 << 20) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let null = File::options().write(true).open("/dev/null")?;
    let (fd, null) = (file.as_raw_fd(), null.as_raw_fd());
    let splice = |from: i32, off: Option<&mut i64>, to: i32, n: usize| {
        let off = off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
        // SAFETY: descriptors this process owns; `off` is null or points
        // to a live i64.
        let r = unsafe { libc::splice(from, off, to, std::ptr::null_mut(), n, 0) };
        if r <= 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    };
    let (mut at, mut done, mut calls) = (start as i64, 0, 0u64);
    let t = Instant::now();
    while done < total {
        let mut in_pipe = 0;
        while in_pipe + piece <= BATCH {
            let mut off = at;
            in_pipe += splice(fd, Some(&mut off), wr, piece)?;
            at += 2 * piece as i64;
            calls += 1;
        }
        done += in_pipe;
        while in_pipe > 0 {
            in_pipe -= splice(rd, None, null, in_pipe)?;
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "piece {} KiB: {calls} calls, {:.2} us per call, {:.0} us per MiB",
        piece >> 10,
        s / calls as f64 * 1e6,
        s / (done as f64 / (1 << 20) as f64) * 1e6
    );
    Ok(())
}
