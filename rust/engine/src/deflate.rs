//! One-shot deflate (RFC 1951) for small bodies held whole: greedy matches found through a
//! single-entry hash table, written with the fixed Huffman codes.
//!
//! Why not zlib-rs at level 1, which makes the same kind of stream: it is made for streams
//! of any length. Each new stream clears a 128 KiB hash table and a 48 KiB symbol buffer,
//! and its loop keeps the state a stream needs. On a 16 KiB JSON body this takes 10 us
//! where zlib-rs takes 17 us, before its reset (`bench/compression`; the gateway's gzip
//! requests went from 38.9 to 29.5 us of CPU). The table here is 32 KiB and never cleared:
//! entries carry a generation offset. Bodies too big for it, or of unknown length, still go
//! through zlib-rs (`compress.rs`).
//!
//! Output larger than the same bytes stored (random bytes: fixed codes spend 9 bits
//! on half the byte values) is sent as stored blocks instead.

use std::cell::RefCell;

/// Largest body compressed this way; bigger ones stream through zlib-rs.
pub const MAX_INPUT: usize = 128 * 1024;

const WINDOW: usize = 32 * 1024;
const MIN_MATCH: usize = 4;
const MAX_MATCH: usize = 258;
const HASH_BITS: u32 = 13;

/// Positions of recent 4-byte sequences, one per hash, kept per thread between calls.
/// An entry is `base + position` of the call that wrote it; anything below the current
/// call's `base` is from an earlier body and ignored, so the table is never cleared.
struct Table {
    slots: Box<[u32; 1 << HASH_BITS]>,
    base: u32,
}

thread_local! {
    /// Where a body is encoded before it is known to be smaller than stored.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static TABLE: RefCell<Table> = RefCell::new(Table {
        slots: Box::new([0; 1 << HASH_BITS]),
        base: 1,
    });
}

/// Bits gathered least significant first, as deflate packs them, into a buffer with room
/// for the worst case: every put stores eight bytes and keeps the ones completed, which
/// costs no branch.
struct Bits<'a> {
    buf: &'a mut [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl Bits<'_> {
    #[inline(always)]
    fn put(&mut self, bits: u32, count: u32) {
        debug_assert!(count <= 32 && u64::from(bits) < 1 << count);
        self.acc |= u64::from(bits) << self.n;
        self.n += count;
        self.buf[self.pos..self.pos + 8].copy_from_slice(&self.acc.to_le_bytes());
        let done = self.n / 8;
        self.pos += done as usize;
        self.acc >>= done * 8;
        self.n -= done * 8;
    }

    /// Pad to a byte boundary; the length of the output.
    fn finish(mut self) -> usize {
        self.put(0, (8 - self.n % 8) % 8);
        self.pos
    }
}

/// `bits` of `code`, most significant first (how Huffman codes are defined), reversed into
/// the order they go on the wire.
const fn reversed(code: u32, bits: u32) -> u32 {
    code.reverse_bits() >> (32 - bits)
}

/// A fixed code for each literal byte: (wire bits, count).
const LITERALS: [(u32, u32); 256] = {
    let mut t = [(0, 0); 256];
    let mut b = 0;
    while b < 256 {
        t[b] = if b < 144 {
            (reversed(0x30 + b as u32, 8), 8)
        } else {
            (reversed(0x190 + (b as u32 - 144), 9), 9)
        };
        b += 1;
    }
    t
};

/// The fixed code of a length/literal symbol from 256 up.
const fn symbol_code(symbol: u32) -> (u32, u32) {
    if symbol < 280 {
        (reversed(symbol - 256, 7), 7)
    } else {
        (reversed(0xc0 + (symbol - 280), 8), 8)
    }
}

const END_OF_BLOCK: (u32, u32) = symbol_code(256);

/// Base lengths and extra bits of length symbols 257..=285 (RFC 1951 §3.2.5).
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195,
    227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073,
    4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13,
];

/// The whole code of each match length 3..=258: symbol code then extra bits, as
/// (wire bits, count).
const LENGTHS: [(u32, u32); MAX_MATCH + 1] = {
    let mut t = [(0, 0); MAX_MATCH + 1];
    let mut s = 0;
    while s < 29 {
        let (code, count) = symbol_code(257 + s as u32);
        let base = LENGTH_BASE[s] as usize;
        let extra = LENGTH_EXTRA[s] as u32;
        let mut len = base;
        // Symbol 284 reaches 258 (227 + 31), but 258 has its own symbol, 285, written last.
        while len < base + (1 << extra) && len <= MAX_MATCH {
            t[len] = (code | ((len - base) as u32) << count, count + extra);
            len += 1;
        }
        s += 1;
    }
    t
};

/// Distance symbol of distances 1..=256 by `d - 1`, and of 257..=32768 by `(d - 1) >> 7`.
const DIST_SMALL: [u8; 256] = {
    let mut t = [0; 256];
    let mut s = 0;
    while s < 30 {
        let mut d = DIST_BASE[s] as usize;
        while d < DIST_BASE[s] as usize + (1 << DIST_EXTRA[s]) && d <= 256 {
            t[d - 1] = s as u8;
            d += 1;
        }
        s += 1;
    }
    t
};
const DIST_LARGE: [u8; 256] = {
    let mut t = [0; 256];
    let mut s = 16;
    while s < 30 {
        let first = (DIST_BASE[s] as usize - 1) >> 7;
        let last = (DIST_BASE[s] as usize + (1 << DIST_EXTRA[s]) - 2) >> 7;
        let mut i = first;
        while i <= last {
            t[i] = s as u8;
            i += 1;
        }
        s += 1;
    }
    t
};

/// Each distance symbol's 5-bit code as it goes on the wire.
const DIST_CODE: [u32; 30] = {
    let mut t = [0; 30];
    let mut s = 0;
    while s < 30 {
        t[s] = reversed(s as u32, 5);
        s += 1;
    }
    t
};

#[inline(always)]
fn distance_code(d: usize) -> (u32, u32) {
    let s = if d <= 256 {
        DIST_SMALL[d - 1]
    } else {
        DIST_LARGE[(d - 1) >> 7]
    } as usize;
    let extra = DIST_EXTRA[s] as u32;
    (
        DIST_CODE[s] | ((d - DIST_BASE[s] as usize) as u32) << 5,
        5 + extra,
    )
}

#[inline(always)]
fn load32(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

#[inline(always)]
fn load64(data: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn hash(v: u32) -> usize {
    (v.wrapping_mul(0x9e37_79b1) >> (32 - HASH_BITS)) as usize
}

/// How many bytes from `a` and `b` (`a < b`) are equal, up to `max`.
#[inline(always)]
fn common_length(data: &[u8], a: usize, b: usize, max: usize) -> usize {
    let mut n = 0;
    while n + 8 <= max {
        let x = load64(data, a + n) ^ load64(data, b + n);
        if x != 0 {
            return n + (x.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    while n < max && data[a + n] == data[b + n] {
        n += 1;
    }
    n
}

/// Append the deflate stream of `data` (one final block) to `out`.
pub fn compress(data: &[u8], out: &mut Vec<u8>) {
    assert!(data.len() <= MAX_INPUT, "body too large for one-shot deflate");
    // Fixed codes spend at most 9 bits on a byte; plus the block's own 10 bits and the
    // eight bytes each put may store past its end.
    let worst = data.len() + data.len() / 8 + 16;
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < worst {
            scratch.resize(worst, 0);
        }
        let mut bits = Bits {
            buf: &mut scratch[..],
            pos: 0,
            acc: 0,
            n: 0,
        };
        bits.put(0b011, 3); // final block, fixed codes
        TABLE.with(|t| fixed_block(data, &mut t.borrow_mut(), &mut bits));
        bits.put(END_OF_BLOCK.0, END_OF_BLOCK.1);
        let len = bits.finish();
        if len > stored_size(data.len()) {
            stored(data, out);
        } else {
            out.extend_from_slice(&scratch[..len]);
        }
    });
}

fn fixed_block(data: &[u8], table: &mut Table, bits: &mut Bits<'_>) {
    let n = data.len();
    if table.base as usize > (u32::MAX as usize) - n - 1 {
        table.slots.fill(0);
        table.base = 1;
    }
    let base = table.base;
    table.base += n as u32 + 1;
    let slots = &mut table.slots;

    let mut literals_from = 0;
    let mut i = 0;
    // A match needs four bytes to hash; the last few bytes are always literals.
    while i + MIN_MATCH <= n {
        let v = load32(data, i);
        let h = hash(v);
        let seen = slots[h];
        slots[h] = base + i as u32;
        if seen >= base {
            let at = (seen - base) as usize;
            let distance = i - at;
            if distance <= WINDOW && load32(data, at) == v {
                let len = MIN_MATCH
                    + common_length(
                        data,
                        at + MIN_MATCH,
                        i + MIN_MATCH,
                        (n - i).min(MAX_MATCH) - MIN_MATCH,
                    );
                literals(&data[literals_from..i], bits);
                let (lcode, lcount) = LENGTHS[len];
                let (dcode, dcount) = distance_code(distance);
                bits.put(lcode | dcode << lcount, lcount + dcount);
                i += len;
                literals_from = i;
                // Remember the match's last position too: runs of similar records
                // (JSON arrays) often continue right there.
                if i + MIN_MATCH <= n && len > MIN_MATCH {
                    let p = i - 2;
                    slots[hash(load32(data, p))] = base + p as u32;
                }
                continue;
            }
        }
        i += 1;
    }
    literals(&data[literals_from..], bits);
}

#[inline(always)]
fn literals(run: &[u8], bits: &mut Bits<'_>) {
    for &b in run {
        let (code, count) = LITERALS[b as usize];
        bits.put(code, count);
    }
}

/// Size of `len` bytes as stored blocks.
fn stored_size(len: usize) -> usize {
    len + 5 * len.div_ceil(0xffff).max(1)
}

fn stored(data: &[u8], out: &mut Vec<u8>) {
    let mut chunks = data.chunks(0xffff).peekable();
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let len = chunk.len() as u16;
        out.push(u8::from(last));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(stream)
            .read_to_end(&mut out)
            .expect("a valid deflate stream");
        out
    }

    fn round_trip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        compress(data, &mut out);
        assert_eq!(inflate(&out), data, "round trip of {} bytes", data.len());
        out
    }

    /// A small deterministic generator, so failures reproduce.
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

    fn json(records: usize) -> Vec<u8> {
        let mut s = String::from("[");
        for i in 0..records {
            s.push_str(&format!(
                r#"{{"id":{i},"name":"user {i}","email":"user{i}@example.com","active":{},"score":{}}},"#,
                i % 3 == 0,
                (i * 7919) % 1000
            ));
        }
        s.push(']');
        s.into_bytes()
    }

    #[test]
    fn the_code_tables_match_the_rfc() {
        // Spot checks against RFC 1951 §3.2.6 (codes written most significant bit first).
        assert_eq!(LITERALS[0], (reversed(0b0011_0000, 8), 8));
        assert_eq!(LITERALS[143], (reversed(0b1011_1111, 8), 8));
        assert_eq!(LITERALS[144], (reversed(0b1_1001_0000, 9), 9));
        assert_eq!(LITERALS[255], (reversed(0b1_1111_1111, 9), 9));
        assert_eq!(END_OF_BLOCK, (0, 7));
        // Length 258 is symbol 285 (8 bits, no extra); 257 is symbol 284 with extra 30.
        assert_eq!(LENGTHS[258], (reversed(0b1100_0101, 8), 8));
        assert_eq!(LENGTHS[257], (reversed(0b1100_0100, 8) | 30 << 8, 13));
        assert_eq!(LENGTHS[3], (reversed(1, 7), 7));
        assert_eq!(distance_code(1), (0, 5));
        assert_eq!(distance_code(32768), (reversed(29, 5) | 8191 << 5, 18));
        assert_eq!(distance_code(257), (reversed(16, 5), 12));
        for (len, code) in LENGTHS.iter().enumerate().skip(3) {
            assert!(code.1 >= 7, "length {len} has a code");
        }
    }

    #[test]
    fn small_and_edge_inputs_round_trip() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            b"abcdabcd",
            b"aaaaaaaaaaaaaaaaaaaaa",
        ] {
            round_trip(data);
        }
        // Every match length and runs longer than one match.
        for len in 0..600 {
            round_trip(&vec![b'x'; len]);
        }
    }

    #[test]
    fn json_round_trips_and_shrinks() {
        let data = json(200);
        let out = round_trip(&data);
        assert!(out.len() * 3 < data.len(), "{} of {}", out.len(), data.len());
    }

    #[test]
    fn matches_reach_the_whole_window_and_no_further() {
        // The same 64 random bytes 32,768 apart (in range), then 32,769 apart (out of it).
        let block = noise(7, 64);
        for gap in [WINDOW - 64, WINDOW - 63, WINDOW + 10] {
            let mut data = block.clone();
            data.extend(noise(gap as u64, gap));
            data.extend(&block);
            round_trip(&data);
        }
    }

    #[test]
    fn incompressible_input_is_stored_and_round_trips() {
        for len in [100, 70_000, MAX_INPUT] {
            let data = noise(len as u64, len);
            let out = round_trip(&data);
            assert!(out.len() <= stored_size(len), "{} for {len}", out.len());
        }
    }

    #[test]
    fn mixed_inputs_round_trip_and_bodies_do_not_leak_into_each_other() {
        // Consecutive calls share the hash table: a match into a previous body would
        // decode to the wrong bytes.
        let a = json(300);
        let mut b = a.clone();
        b.reverse();
        for seed in 0..40u64 {
            let mut data = if seed % 2 == 0 { a.clone() } else { b.clone() };
            let cut = (seed as usize * 997) % data.len();
            data.truncate(cut);
            data.extend(noise(seed, (seed as usize * 31) % 500));
            round_trip(&data);
        }
    }

    #[test]
    fn inputs_from_small_alphabets_round_trip() {
        // Few distinct bytes: matches of every length and distance, literals between.
        for seed in 1..120u64 {
            let alphabet = 2 + (seed % 7) as u8;
            let len = (seed as usize * 7717) % 40_000;
            let data: Vec<u8> = noise(seed, len).iter().map(|b| b'a' + b % alphabet).collect();
            round_trip(&data);
        }
    }

    #[test]
    fn the_generation_offset_wraps() {
        TABLE.with(|t| t.borrow_mut().base = u32::MAX - 1000);
        round_trip(&json(50));
        round_trip(&json(50));
        assert!(TABLE.with(|t| t.borrow().base) < 1_000_000);
    }
}
