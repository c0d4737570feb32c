//! The in-flight region a VMM hands over with INFLIGHT_SHMFD, as a restarted backend reads it
//! (`inflight::recover`): bytes → one queue's part of the region, a queue size and the used
//! ring's index → accepted (heads to resubmit) or refused.
//!
//! Checked for every input:
//! - nothing panics, whatever the region holds and however short it is;
//! - a refused region is left exactly as it was;
//! - an accepted one yields heads below the queue size, no head twice, in ascending order of
//!   the counters the region holds for them, none of them in flight in the last batch that
//!   the used index shows complete, and a next counter above all of them;
//! - recovering again from the fixed-up region with the same used index gives the same heads
//!   (the fix-up is done once);
//! - a fresh region (version 0) is initialised to an empty record that recovers to nothing.

use arbitrary::{Result, Unstructured};
use vhost_user_vhdx::inflight::{queue_region_size, recover};
use vm_memory::VolatileSlice;

const HEADER: usize = 16;
const ENTRY: usize = 16;

fn counter(region: &[u8], head: u16) -> u64 {
    let at = HEADER + ENTRY * usize::from(head) + 8;
    u64::from_le_bytes(region[at..at + 8].try_into().unwrap())
}

pub fn run(data: &[u8]) {
    let _ = drive(Unstructured::new(data));
}

fn drive(mut u: Unstructured) -> Result<()> {
    let u = &mut u;
    // Queue sizes as `serve --queue-size` allows (powers of two up to 32768), sometimes any.
    let queue_size: u16 = if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        1 << u.int_in_range(0..=15u8)?
    };
    let used_idx: u16 = u.arbitrary()?;
    // The region: usually exactly one queue's part, sometimes shorter or longer.
    let exact = queue_region_size(queue_size);
    let len = match u.int_in_range(0..=7u8)? {
        0 => u.int_in_range(0..=exact + 64)?,
        _ => exact,
    };
    let mut region = vec![0u8; len];
    // Header fields are often chosen to pass the first checks, so that the entries matter.
    let mut header = [0u8; HEADER];
    u.fill_buffer(&mut header)?;
    if len >= HEADER {
        if u.ratio(3, 4)? {
            header[8..10].copy_from_slice(&1u16.to_le_bytes());
            header[10..12].copy_from_slice(&queue_size.to_le_bytes());
        }
        if u.ratio(1, 2)? {
            let behind: u16 = u.int_in_range(0..=4)?;
            header[14..16].copy_from_slice(&used_idx.wrapping_sub(behind).to_le_bytes());
            let last: u16 = u.int_in_range(0..=queue_size.saturating_sub(1))?;
            header[12..14].copy_from_slice(&last.to_le_bytes());
        }
        region[..HEADER].copy_from_slice(&header);
    }
    // Entries: a few chosen (in flight, a link, a small counter), the rest from the bytes.
    let entries = (len.saturating_sub(HEADER) / ENTRY).min(usize::from(queue_size));
    for _ in 0..u.int_in_range(0..=16u8)? {
        if entries == 0 {
            break;
        }
        let i = u.choose_index(entries)?;
        let at = HEADER + ENTRY * i;
        region[at] = u.int_in_range(0..=2)?;
        let next: u16 = u.int_in_range(0..=queue_size.saturating_sub(1))?;
        region[at + 6..at + 8].copy_from_slice(&next.to_le_bytes());
        let c: u64 = u.int_in_range(0..=64)?;
        region[at + 8..at + 16].copy_from_slice(&c.to_le_bytes());
    }
    let rest = std::mem::replace(u, Unstructured::new(&[])).take_rest();
    if len > HEADER {
        let n = rest.len().min(len - HEADER);
        // Bytes from the input overwrite the entries only where the input has some.
        for (b, &r) in region[HEADER..HEADER + n].iter_mut().zip(rest) {
            *b ^= r;
        }
    }

    let before = region.clone();
    let result = recover(VolatileSlice::from(&mut region[..]), queue_size, used_idx);
    let rec = match result {
        Err(_) => {
            assert_eq!(region, before, "a refused region was changed");
            return Ok(());
        }
        Ok(rec) => rec,
    };
    assert!(len >= exact, "a region too small was accepted");
    if rec.fresh {
        assert!(rec.heads.is_empty());
        assert_eq!(rec.next_counter, 1);
        // Initialised: it recovers to an empty record from now on.
        let again = recover(VolatileSlice::from(&mut region[..]), queue_size, used_idx)
            .expect("an initialised region is accepted");
        assert!(!again.fresh && again.heads.is_empty(), "{again:?}");
        return Ok(());
    }
    let mut seen = vec![false; usize::from(queue_size)];
    let mut last = 0u64;
    for &h in &rec.heads {
        assert!(h < queue_size, "head {h} of a queue of {queue_size}");
        assert!(!seen[usize::from(h)], "head {h} twice");
        seen[usize::from(h)] = true;
        let c = counter(&region, h);
        assert!(c > last, "counters not ascending: {c} after {last}");
        last = c;
        assert!(
            region[HEADER + ENTRY * usize::from(h)] != 0,
            "head {h} is not in flight"
        );
    }
    assert!(
        rec.next_counter > last,
        "next counter {} after {last}",
        rec.next_counter
    );
    // Every entry in flight and not returned was in the last batch, now cleared.
    for i in 0..queue_size {
        if region[HEADER + ENTRY * usize::from(i)] != 0 {
            assert!(
                seen[usize::from(i)],
                "head {i} in flight but not resubmitted"
            );
        }
    }
    let fixed = region.clone();
    let again = recover(VolatileSlice::from(&mut region[..]), queue_size, used_idx)
        .expect("a fixed-up region is accepted again");
    assert_eq!(again.heads, rec.heads, "a second recovery differs");
    assert_eq!(region, fixed, "a second recovery changed the region");
    Ok(())
}
