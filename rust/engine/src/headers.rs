//! Proxy header semantics: hop-by-hop removal (RFC 9110 §7.6.1), forwarding headers,
//! and request ids.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};

/// Headers that describe one connection, never the message: a proxy must not forward them.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    // Expect is answered at our hop: the client gets its 100 Continue from us.
    header::EXPECT,
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Remove hop-by-hop headers, including every header the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present is cheaper than hashing ten names that are absent.
    let mut doomed: SmallVec<[HeaderName; 4]> = SmallVec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            doomed.push(name.clone());
        }
    }
    if doomed.is_empty() {
        return;
    }
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            // The usual tokens are options, not header names (Keep-Alive was found above).
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                doomed.push(name);
            }
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == KEEP_ALIVE || name == PROXY_CONNECTION
}

/// The field names of the last upstream response head that a thread parsed, in order, as
/// written and as parsed. An upstream sends the same names in the same order response after
/// response: a name found at its place again is reused instead of parsed
/// (`HeaderName::from_bytes` validates, lowercases and looks up every name, and allocates
/// the ones `http` does not know: about 100 instructions a field, callgrind). The
/// comparison is exact: a case-blind one cost as much as the parse. Not used for client
/// requests: a benchmark client's single Host field cost more through the memo than
/// parsed, and one thread's clients need not be alike.
#[derive(Default)]
pub struct NameMemo(Vec<(Vec<u8>, HeaderName)>);

/// At most this many names are remembered (a head has a dozen or so).
const NAME_MEMO_MAX: usize = 32;

thread_local! {
    pub static RESPONSE_NAMES: Cell<NameMemo> = const { Cell::new(NameMemo(Vec::new())) };
}

impl NameMemo {
    /// The thread's memo in `slot` (an empty one until it is put back).
    pub fn take(slot: &'static std::thread::LocalKey<Cell<NameMemo>>) -> NameMemo {
        slot.with(Cell::take)
    }

    pub fn put(self, slot: &'static std::thread::LocalKey<Cell<NameMemo>>) {
        slot.with(|s| s.set(self));
    }

    /// The name of a head's `i`th field, `raw` as written; remembered for the next head.
    #[inline(always)]
    pub fn name(&mut self, i: usize, raw: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
        if let Some((known, name)) = self.0.get(i) {
            if known.as_slice() == raw {
                return Ok(name.clone());
            }
        }
        self.parse(i, raw)
    }

    #[inline(never)]
    fn parse(&mut self, i: usize, raw: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
        let name = HeaderName::from_bytes(raw)?;
        if i < self.0.len() {
            self.0[i] = (raw.to_vec(), name.clone());
        } else if i == self.0.len() && i < NAME_MEMO_MAX {
            self.0.push((raw.to_vec(), name.clone()));
        }
        Ok(name)
    }
}

/// Append the client address to X-Forwarded-For, keeping what earlier proxies wrote.
pub fn append_forwarded_for(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(client_ip.clone());
        }
        header::Entry::Occupied(mut e) => {
            // Several X-Forwarded-For headers fold into one list, in order.
            let mut joined = Vec::with_capacity(128);
            for v in e.iter() {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                e.insert(v);
            }
        }
    }
}

/// The capacity of the header maps a worker thread reuses: a request's fields plus those the
/// gateway adds, or an upstream's answer. Such a map's entries take 1,248 bytes, above glibc's
/// per-thread cache (1 KiB chunks), so each one freed and allocated again took the allocator's
/// slow path (callgrind: about 1.2k instructions per request); a spare is also still cached.
const SPARE_CAPACITY: usize = 12;
/// At most this many spare maps per thread (about 1.3 KB each).
const SPARE_MAX: usize = 128;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `fields`: a spare one when that many fit in it.
pub fn header_map(fields: usize) -> HeaderMap {
    if fields > SPARE_CAPACITY {
        return HeaderMap::with_capacity(fields);
    }
    SPARE_MAPS
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| HeaderMap::with_capacity(SPARE_CAPACITY))
}

/// Keep `map`'s storage for a later [`header_map`] (only maps of the spare size that did not
/// grow; the rest are freed as usual).
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() != SPARE_CAPACITY {
        return;
    }
    map.clear();
    SPARE_MAPS.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < SPARE_MAX {
            spare.push(map);
        }
    });
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let addr = &t as *const u64 as u64;
    (t ^ (std::process::id() as u64).rotate_left(32) ^ addr) | 1
}

pub(crate) fn next_u64() -> u64 {
    // xorshift64*: request ids need to be unique, not unpredictable.
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545F4914F6CDD1D)
    })
}

/// Request ids made at once, as slices of one shared buffer.
const IDS_PER_BLOCK: usize = 64;
const ID_LEN: usize = 32;

thread_local! {
    /// The current block of ids and the next one to hand out. An id made on its own was
    /// two allocations per request (its bytes, then the shared count its first clone
    /// promotes them to; callgrind); a slice of a block takes neither. A block lives as
    /// long as any of its ids (2 KiB at most for a long-lived one).
    static IDS: RefCell<(bytes::Bytes, usize)> = const { RefCell::new((bytes::Bytes::new(), IDS_PER_BLOCK)) };
}

/// A fresh 32-hex-digit request id.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id = IDS.with_borrow_mut(|(block, next)| {
        if *next == IDS_PER_BLOCK {
            let mut buf = Vec::with_capacity(IDS_PER_BLOCK * ID_LEN);
            for _ in 0..IDS_PER_BLOCK * 2 {
                let word = next_u64();
                buf.extend((0..16).map(|i| HEX[((word >> (60 - 4 * i)) & 0xf) as usize]));
            }
            *block = bytes::Bytes::from(buf);
            *next = 0;
        }
        *next += 1;
        block.slice((*next - 1) * ID_LEN..*next * ID_LEN)
    });
    HeaderValue::from_maybe_shared(id).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_names_are_reused_only_where_they_match_exactly() {
        let mut memo = NameMemo::default();
        let first = ["Host", "X-Custom", "Accept"];
        for (i, raw) in first.iter().enumerate() {
            assert_eq!(
                memo.name(i, raw.as_bytes()).unwrap(),
                raw.to_ascii_lowercase().as_str()
            );
        }
        // Same place, same bytes: the remembered name (a custom one shares its memory).
        let again = memo.name(1, b"X-Custom").unwrap();
        assert_eq!(again, "x-custom");
        assert_eq!(again.as_str().as_ptr(), memo.0[1].1.as_str().as_ptr());
        // Another case or another name at a place: parsed, and remembered from then on.
        assert_eq!(memo.name(1, b"x-custom").unwrap(), "x-custom");
        assert_eq!(memo.0[1].0, b"x-custom");
        assert_eq!(memo.name(0, b"Accept").unwrap(), "accept");
        assert_eq!(memo.name(2, b"Host").unwrap(), "host");
        // Past the end: appended in order; a gap is parsed but not remembered.
        assert_eq!(memo.name(3, b"Date").unwrap(), "date");
        assert_eq!(memo.name(5, b"Vary").unwrap(), "vary");
        assert_eq!(memo.0.len(), 4);
        assert!(memo.name(6, b"Bad Name").is_err());
        // Bounded.
        for i in 4..100 {
            memo.name(i, format!("x-f{i}").as_bytes()).unwrap();
        }
        assert_eq!(memo.0.len(), NAME_MEMO_MAX);
    }

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("expect", HeaderValue::from_static("100-continue"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-keep"]);
    }

    #[test]
    fn forwarded_for_appends_to_existing_chain() {
        let mut h = HeaderMap::new();
        let me = HeaderValue::from_static("127.0.0.1");
        append_forwarded_for(&mut h, &me);
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1, 10.0.0.2"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.3"));
        append_forwarded_for(&mut h, &me);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn recycled_maps_come_back_empty_with_their_room() {
        let spare = || SPARE_MAPS.with(|s| s.borrow().len());
        let mut map = header_map(3);
        assert_eq!(map.capacity(), SPARE_CAPACITY);
        map.insert("x-one", HeaderValue::from_static("1"));
        map.append("x-one", HeaderValue::from_static("2"));
        let before = spare();
        recycle(map);
        assert_eq!(spare(), before + 1);
        let again = header_map(5);
        assert_eq!(spare(), before);
        assert!(again.is_empty());
        assert_eq!(again.get_all("x-one").iter().count(), 0);
        assert_eq!(again.capacity(), SPARE_CAPACITY);
        // A large request gets a map of its own size, and a map that grew is not kept.
        assert!(header_map(40).capacity() >= 40);
        let mut grown = header_map(1);
        for i in 0..20 {
            grown.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from(i),
            );
        }
        recycle(grown);
        assert_eq!(spare(), before);
        // The spares are bounded.
        for _ in 0..SPARE_MAX + 10 {
            recycle(HeaderMap::with_capacity(SPARE_CAPACITY));
        }
        assert_eq!(spare(), SPARE_MAX);
    }

    #[test]
    fn request_ids_are_hex_and_distinct_across_blocks() {
        let ids: Vec<HeaderValue> = (0..IDS_PER_BLOCK * 3 + 5).map(|_| new_request_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
        }
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
