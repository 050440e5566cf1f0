//! The response cache: answers to chat requests kept in the key-value store and replayed, as
//! JSON or as a stream, to a later request that asks the same thing — exactly the same
//! ([`lookup_exact`]) or, optionally, nearly the same ([`lookup_semantic`]: MinHash signatures and
//! LSH banding). Every request runs in a fresh instance and the store has no TTL, so all state is
//! in the store, and the number of keys is bounded whatever the traffic (a ring of entries).
//!
//! # Use
//!
//! ```text
//! if policy.applies(&req) {                      // cacheable(&req) and a mode other than Off
//!     let key = Key::of(&req, Scope::new(tenant, &req.model));
//!     // index_key(&key) can ride in the request's one batched state read; then:
//!     let mut hit = exact_from(index_value, kv, &key, now)?; // or lookup_exact(kv, &key, now)?
//!     if hit.is_none() {
//!         hit = lookup_semantic(kv, &key, &policy, now)?;    // Mode::Semantic only
//!     }
//!     match hit {
//!         Some(h) => reply render_json(&h.entry, id, created) or render_sse(..); h.counter().op()
//!         None => Counter::Misses.op(); forward; then store(kv, &key, &answer, &policy, now)
//!                 and Counter::Stores.op() (Counter::TooLarge.op() on CacheError::TooLarge)
//!     }
//! }
//! ```
//!
//! Counters ([`Counter`]) are returned as [`KvOp`]s for the component to perform; nothing here
//! writes them.
//!
//! # Exact key
//!
//! SHA-256 of the normalised request: the scope (tenant id and the client's model choice, both
//! given by the caller), the messages, and every body field that can change the answer (all of
//! them but [`IGNORED_FIELDS`]: `stream`, `stream_options`, `user`, `metadata`, …; unknown vendor
//! fields are kept, to be safe). Normalised means canonical JSON written here (object keys sorted
//! whatever `serde_json`'s map keeps, `null` members of the body and of each message dropped,
//! integral floats written as integers: `0.0` = `0`) and a message's `content` given as a single
//! text part written as the plain string.
//!
//! # Semantic key
//!
//! Each message's text (its `content` string, or its text parts joined by newlines) is split
//! into word tokens: runs of letters and digits, lower-cased; everything else separates, except
//! that each CJK, kana, Hangul or Thai character is a token of its own (those scripts do not
//! separate words with spaces). A word of up to 16 ASCII letters and digits (most words) is
//! found, lower-cased and hashed 8 bytes at a time (`word_hash`: its bytes scrambled by
//! multiply–xor-shift mixing); other words are hashed with XXH3. Shingles are 3 consecutive
//! tokens (a text of 1 or 2 tokens uses its tokens). A message is sketched by one-permutation MinHash:
//! each shingle hash picks one of [`BINS`] = 256 bins by its top 8 bits and keeps the smallest of
//! its low 32 bits there; empty bins borrow from the next filled bin to the right, mixed with the
//! distance (densification by rotation, Shrivastava & Li 2014), so two sketches agree on a bin
//! with probability equal to the Jaccard similarity of the two shingle sets. That is linear in
//! the text with one hash per token and a few multiplications per shingle. A message with at
//! most [`SMALL_SET`] distinct shingles is also kept as its exact set of shingle hashes, and is
//! compared exactly (small sets are where MinHash estimates are noisiest). The whole
//! conversation's sketch is the bin-wise minimum of its messages' (the union of their shingles).
//!
//! A semantic hit needs all of:
//! * the same **frame**: scope, every answer-changing parameter, the role sequence, each
//!   message's non-text content (images, tool calls, names…), each message's **numbers** (the
//!   digits with the arithmetic signs between them, spaces ignored: `17*23` ≠ `17*24` ≠ `17+23`)
//!   and each message's first and last [`ANCHOR_WORDS`] word tokens (instructions sit at the
//!   start or end of a prompt: "…translate into French" ≠ "…into German"), all hashed into a
//!   128-bit frame that is stored in the entry and mixed into the LSH bucket numbers, so
//!   different frames do not even share buckets;
//! * **every message** similar: estimated (or exact) Jaccard ≥ the threshold, message by
//!   message — an earlier turn that differs is a miss even when a long system prompt makes the
//!   conversations look alike as a whole (the usual false hit of semantic caches);
//! * the **whole conversation** similar: Jaccard ≥ the threshold.
//!
//! # LSH and threshold
//!
//! Candidates come from [`BANDS`] = 8 bands of [`ROWS`] = 8 bins (bins 0..64 of the whole
//! conversation's sketch): a band's 8 values and the frame hash to a 16-bit bucket, which points
//! to the last entry stored there. Two conversations of Jaccard similarity `s` share at least one
//! bucket with probability `1 − (1 − s⁸)⁸` (the S-curve, midpoint `(1/8)^(1/8)` ≈ 0.77):
//!
//! | s | 0.50 | 0.60 | 0.70 | 0.75 | 0.80 | 0.85 | 0.90 | 0.95 | 0.98 |
//! |---|------|------|------|------|------|------|------|------|------|
//! | P(candidate) | 0.031 | 0.127 | 0.378 | 0.570 | 0.770 | 0.922 | 0.989 | 0.9998 | ≈1 |
//!
//! So nearly every entry at or above the default threshold is found, few unrelated ones are read,
//! and a lookup reads 8 bucket keys (one `get_many`) and at most 8 candidate entries (a second
//! `get_many`); a store writes 8 bucket keys. More bands would raise recall at 0.9 from 98.9 %
//! (16 × 8: 99.99 %) at the cost of one more write per band on every store.
//!
//! The default threshold, [`DEFAULT_THRESHOLD`] = 0.9, is conservative: changing one word of a
//! message of `n` words changes at most 3 of its `n − 2` shingles, Jaccard ≈ (n − 5)/(n + 1), so
//! 0.9 tolerates one changed word only in messages of about 60 words or more, a few words in
//! long prompts, and nothing in short questions (which then need the same words, ignoring case
//! and punctuation). The estimate over 256 bins has a standard deviation of about 0.02 near 0.9
//! (it is unbiased), and sets of up to 256 shingles are compared exactly: in 6 000 trials of
//! pairs of 300 to 2 200 shingles at a true similarity of 0.83, 3 passed 0.9 (0.05 %), fewer
//! further down; and numbers, anchors and non-text content must match exactly anyway.
//!
//! # Storage
//!
//! Keys, all bounded in number (see `kv-schema/README.md`, section "Cache"):
//! * `cache:v1:next` — i64 counter: each store increments it; the new value is the write's
//!   generation `g`, and its slot is `(g − 1) mod max_entries`.
//! * `cache:v1:entry:<slot>` — the entry's head: [`HEAD_MAGIC`], generation, chunk count, total
//!   length, XXH3-64 digest of the whole encoded entry, then its first bytes; the rest in
//!   `cache:v1:entry:<slot>:<i>` (`i` = 1…, each the generation then data), every value at most
//!   [`CHUNK_BYTES`]. The encoded entry is the JSON of [`Entry`]. A store of the same slot later
//!   overwrites it (the ring: oldest first). A reader that finds a chunk missing, from another
//!   generation, or a digest that does not match, has a miss.
//! * `cache:v1:x:<first 4 hex digits of the exact hash>` — `<slot>:<generation>:<hash hex>`:
//!   last writer wins; the reader checks the hash, the generation, and the entry's own hash and
//!   scope, so a collision or an overwritten slot is a miss, never a wrong hit.
//! * `cache:v1:lsh:<band>:<4 hex digits>` — `<slot>:<generation>`, last writer wins.
//!
//! Entries carry `expires_ms`; readers ignore expired ones and the ring overwrites them.

use crate::kv::{keys, Kv, KvError, KvOp, KvResult};
use crate::wire::openai::{ChatRequest, Usage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Number, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::io::Write;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Every key of the cache starts with this (the version segment changes with the encoding).
pub const PREFIX: &str = "cache:v1:";
/// The ring's write counter.
pub const NEXT_KEY: &str = "cache:v1:next";
/// Largest value written to one key (head or chunk), header included.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Largest encoded entry [`store`] accepts; beyond it, [`CacheError::TooLarge`] and no write.
pub const MAX_ENTRY_BYTES: usize = 2 * 1024 * 1024;
/// Bytes before the data in a head value: magic, generation, chunk count, total length, digest.
const HEAD_LEN: usize = 4 + 8 + 2 + 4 + 8;
/// Bytes before the data in a chunk value: the generation.
const CHUNK_HEAD_LEN: usize = 8;
/// Most chunks after the head an entry of [`MAX_ENTRY_BYTES`] needs; a head claiming more is
/// corrupt. (So a slot has at most 1 + `MAX_CHUNKS` keys.)
pub const MAX_CHUNKS: usize =
    (MAX_ENTRY_BYTES - (CHUNK_BYTES - HEAD_LEN)).div_ceil(CHUNK_BYTES - CHUNK_HEAD_LEN);
/// First bytes of every head value.
pub const HEAD_MAGIC: &[u8; 4] = b"FRc1";

/// MinHash bins per sketch (one-permutation hashing: a shingle's top 8 bits).
pub const BINS: usize = 256;
const BIN_BITS: u32 = 8;
/// LSH bands, each of [`ROWS`] bins: the buckets read per lookup and written per store.
pub const BANDS: usize = 8;
/// Bins per LSH band.
pub const ROWS: usize = 8;
/// Words per shingle.
pub const SHINGLE_WORDS: usize = 3;
/// Sets of at most this many distinct shingles are stored and compared exactly.
pub const SMALL_SET: usize = 256;
/// Word tokens at each end of every message that must be identical for a semantic hit.
pub const ANCHOR_WORDS: usize = 8;
/// Default lifetime of an entry: one hour.
pub const DEFAULT_TTL_MS: u64 = 3_600_000;
/// Default similarity threshold (estimated Jaccard over word 3-shingles).
pub const DEFAULT_THRESHOLD: f64 = 0.9;
/// Default ring size (entries kept at most). Worst case in the store: this × [`MAX_ENTRY_BYTES`].
pub const DEFAULT_MAX_ENTRIES: u32 = 1024;
/// Content bytes per `chat.completion.chunk` event when an answer is replayed as a stream.
pub const SSE_PIECE_BYTES: usize = 4096;

/// Body fields that do not change the answer, left out of both keys. Everything else is kept,
/// unknown fields included. (`model` is in the [`Scope`]; `messages` is keyed on its own.)
pub const IGNORED_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// What the cache does for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Off,
    /// Identical requests only.
    Exact,
    /// Identical requests, then similar ones.
    Semantic,
}

/// The cache's settings: the seam for the policy language, which will build these per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// How long an entry answers (from when it is stored).
    pub ttl_ms: u64,
    /// Least similarity for a semantic hit (Jaccard over word 3-shingles, 0..=1).
    pub threshold: f64,
    /// Ring size: entries kept at most (the oldest is overwritten). 0 counts as 1.
    pub max_entries: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Semantic,
            ttl_ms: DEFAULT_TTL_MS,
            threshold: DEFAULT_THRESHOLD,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

impl Policy {
    /// Whether the cache is consulted (and fed) for this request: a mode other than `Off` and
    /// [`cacheable`].
    pub fn applies(&self, req: &ChatRequest) -> bool {
        self.mode != Mode::Off && cacheable(req)
    }

    fn ring(&self) -> u64 {
        u64::from(self.max_entries.max(1))
    }
}

/// The default rule for what may be answered from the cache: a deterministic request
/// (`temperature` 0 or a `seed`), one answer (`n` absent or 1), and nothing the cache cannot
/// replay or that depends on the outside world: no `tools`/`functions`, no `logprobs`, no audio
/// output, no web search.
pub fn cacheable(req: &ChatRequest) -> bool {
    let b = req.body();
    let absent = |k: &str| match b.get(k) {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    let deterministic = b.get("temperature").and_then(Value::as_f64) == Some(0.0)
        || b.get("seed").is_some_and(|s| s.is_i64() || s.is_u64());
    let one = match b.get("n") {
        None | Some(Value::Null) => true,
        Some(n) => n.as_u64() == Some(1),
    };
    let audio = !absent("audio")
        || b.get("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|x| x.as_str() == Some("audio")));
    deterministic
        && one
        && absent("tools")
        && absent("functions")
        && b.get("logprobs") != Some(&Value::Bool(true))
        && !audio
        && absent("web_search_options")
}

/// Whose cache an entry belongs to: entries are only ever answered within the same scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    /// The tenant (e.g. the client key's digest).
    pub tenant: String,
    /// The client's model choice (`req.model`: `auto`, `groq/…`, an alias…).
    pub model: String,
}

impl Scope {
    pub fn new(tenant: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            model: model.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Canonical JSON

/// Writes `v` as canonical JSON: object keys sorted, integral floats as integers.
fn canon(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => canon_number(n, out),
        Value::String(s) => canon_str(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canon(x, out);
            }
            out.push(b']');
        }
        Value::Object(m) => canon_object(m.iter().map(|(k, v)| (k.as_str(), v)), out, |_, v, o| {
            canon(v, o)
        }),
    }
}

/// An object from its members, sorted by key; each value written by `value(key, value, out)`.
fn canon_object<'a>(
    members: impl Iterator<Item = (&'a str, &'a Value)>,
    out: &mut Vec<u8>,
    mut value: impl FnMut(&str, &'a Value, &mut Vec<u8>),
) {
    let mut ms: Vec<(&str, &Value)> = members.collect();
    ms.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (k, v)) in ms.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        canon_str(k, out);
        out.push(b':');
        value(k, v, out);
    }
    out.push(b'}');
}

fn canon_number(n: &Number, out: &mut Vec<u8>) {
    if n.is_f64() {
        if let Some(f) = n.as_f64() {
            // Below 2^53 every integer is exact in an f64: `0.0` and `0` are the same request.
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                let _ = write!(out, "{}", f as i64);
                return;
            }
        }
    }
    let _ = write!(out, "{n}");
}

fn canon_str(s: &str, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The answer-changing body fields, as a canonical object.
fn canon_params(body: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    canon_object(
        body.iter()
            .filter(|(k, v)| !v.is_null() && !IGNORED_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v)),
        &mut out,
        |_, v, o| canon(v, o),
    );
    out
}

/// A content array of exactly one plain text part: the same as its text as a string.
fn single_text_part(v: &Value) -> Option<&str> {
    let [part] = v.as_array()?.as_slice() else {
        return None;
    };
    let p = part.as_object()?;
    (p.len() == 2 && p.get("type")?.as_str()? == "text")
        .then(|| p.get("text")?.as_str())
        .flatten()
}

/// A message for the exact key: null members dropped, a single text part as a string.
fn canon_message(m: &Value, out: &mut Vec<u8>) {
    let Value::Object(m) = m else {
        canon(m, out);
        return;
    };
    canon_object(
        m.iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.as_str(), v)),
        out,
        |k, v, o| match single_text_part(v).filter(|_| k == "content") {
            Some(t) => canon_str(t, o),
            None => canon(v, o),
        },
    );
}

/// A message's text (what the semantic sketch reads) and its residue (everything else, as
/// canonical JSON: must be identical for a semantic hit).
fn split_message(m: &Value) -> (Cow<'_, str>, Vec<u8>) {
    let mut residue = Vec::with_capacity(32);
    let Value::Object(obj) = m else {
        canon(m, &mut residue);
        return (Cow::Borrowed(""), residue);
    };
    let content = obj.get("content");
    let parts = content.and_then(Value::as_array);
    let is_text = |p: &Value| {
        p.get("type").and_then(Value::as_str) == Some("text")
            && p.get("text").is_some_and(Value::is_string)
    };
    let text: Cow<'_, str> = match (content, parts) {
        (Some(Value::String(s)), _) => Cow::Borrowed(s),
        (_, Some(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| is_text(p))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            match texts.as_slice() {
                [] => Cow::Borrowed(""),
                [one] => Cow::Borrowed(*one),
                many => Cow::Owned(many.join("\n")),
            }
        }
        _ => Cow::Borrowed(""),
    };
    // Content made only of plain text parts is all text; otherwise the non-text parts (and
    // where the text parts sit) stay in the residue.
    let all_text = parts.is_some_and(|ps| {
        ps.iter()
            .all(|p| is_text(p) && p.as_object().is_some_and(|o| o.len() == 2))
    });
    canon_object(
        obj.iter()
            .filter(|(k, v)| {
                !v.is_null() && !(k.as_str() == "content" && (v.is_string() || all_text))
            })
            .map(|(k, v)| (k.as_str(), v)),
        &mut residue,
        |k, v, o| match v.as_array() {
            // Text parts keep their place (and any other member) without their text.
            Some(ps) if k == "content" => {
                o.push(b'[');
                for (i, p) in ps.iter().enumerate() {
                    if i > 0 {
                        o.push(b',');
                    }
                    match p.as_object().filter(|_| is_text(p)) {
                        Some(po) => canon_object(
                            po.iter()
                                .filter(|(k, _)| k.as_str() != "text")
                                .map(|(k, v)| (k.as_str(), v)),
                            o,
                            |_, v, o| canon(v, o),
                        ),
                        None => canon(p, o),
                    }
                }
                o.push(b']');
            }
            _ => canon(v, o),
        },
    );
    (text, residue)
}

// ---------------------------------------------------------------------------------------------
// Key

/// A request's cache identity: the exact hash now, the semantic sketch when first asked for.
#[derive(Debug)]
pub struct Key<'r> {
    messages: &'r [Value],
    scope: Scope,
    hash: [u8; 32],
    hash_hex: String,
    params: Vec<u8>,
    roles: Vec<String>,
    semantic: OnceCell<Semantic>,
}

impl<'r> Key<'r> {
    /// The key of `req` within `scope`: SHA-256 of the normalised request (see the module doc).
    pub fn of(req: &'r ChatRequest, scope: Scope) -> Self {
        let body = req.body();
        let messages: &[Value] = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        let params = canon_params(body);
        let roles = messages
            .iter()
            .map(|m| {
                m.get("role")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        let mut buf = Vec::with_capacity(1024);
        buf.extend_from_slice(b"freerelay cache v1\n");
        canon_str(&scope.tenant, &mut buf);
        buf.push(b'\n');
        canon_str(&scope.model, &mut buf);
        buf.push(b'\n');
        buf.extend_from_slice(&params);
        buf.extend_from_slice(b"\n[");
        for (i, m) in messages.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            canon_message(m, &mut buf);
        }
        buf.push(b']');
        let hash: [u8; 32] = Sha256::digest(&buf).into();
        Self {
            messages,
            scope,
            hash,
            hash_hex: hex(&hash),
            params,
            roles,
            semantic: OnceCell::new(),
        }
    }

    /// SHA-256 of the normalised request.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// [`Self::hash`] in lower-case hex.
    pub fn hash_hex(&self) -> &str {
        &self.hash_hex
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The messages' roles, in order.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// The semantic sketch (computed on first use, then kept).
    pub fn semantic(&self) -> &Semantic {
        self.semantic
            .get_or_init(|| Semantic::of(&self.scope, &self.params, self.messages))
    }
}

/// The exact index key of a request: `cache:v1:x:<first 4 hex digits of its hash>`. The gateway
/// may read it in its batched state read and pass the value to [`exact_from`].
pub fn index_key(key: &Key) -> String {
    format!("{PREFIX}x:{}", &key.hash_hex[..4])
}

/// The head key of a slot: `cache:v1:entry:<slot>`.
pub fn entry_key(slot: u64) -> String {
    format!("{PREFIX}entry:{slot}")
}

/// A slot's `i`-th chunk after the head (`i` ≥ 1): `cache:v1:entry:<slot>:<i>`.
pub fn chunk_key(slot: u64, i: usize) -> String {
    format!("{PREFIX}entry:{slot}:{i}")
}

/// An LSH bucket key: `cache:v1:lsh:<band>:<4 hex digits>`.
pub fn bucket_key(band: usize, bucket: u16) -> String {
    format!("{PREFIX}lsh:{band}:{bucket:04x}")
}

// ---------------------------------------------------------------------------------------------
// Sketches

/// An empty bin before densification.
const EMPTY: u32 = u32::MAX;

/// Scrambles the bits of `x` (a bijection: multiply by odd constants and xor-shift).
#[inline]
fn scramble(mut x: u64) -> u64 {
    x ^= x >> 31;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 32)
}

/// One shingle's hash from its three token hashes (order matters: the rotations differ).
#[inline]
fn shingle(a: u64, b: u64, c: u64) -> u64 {
    scramble(a ^ b.rotate_left(21) ^ c.rotate_left(42))
}

/// A lone token's hash, for texts of 1 or 2 tokens.
#[inline]
fn single(t: u64) -> u64 {
    scramble(t ^ 0x5bd1_e995_7c3f_a1d3)
}

/// One-permutation MinHash before densification: the least low-32-bit value per bin.
#[derive(Clone)]
struct Raw([u32; BINS]);

impl Raw {
    fn new() -> Self {
        Raw([EMPTY; BINS])
    }

    #[inline]
    fn add(&mut self, h: u64) {
        let bin = (h >> (64 - BIN_BITS)) as usize;
        // EMPTY marks an empty bin: the one value it would hide is folded into its neighbour.
        let v = (h as u32).min(EMPTY - 1);
        if v < self.0[bin] {
            self.0[bin] = v;
        }
    }

    fn merge(&mut self, other: &Raw) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = (*a).min(*b);
        }
    }

    fn filled(&self) -> usize {
        self.0.iter().filter(|&&v| v != EMPTY).count()
    }

    /// Fills each empty bin from the nearest filled bin to its right (circularly), mixed with
    /// the distance: two sketches then agree on any bin with probability = Jaccard.
    fn densify(&self) -> Signature {
        let Some(last) = (0..BINS).rev().find(|&i| self.0[i] != EMPTY) else {
            return Signature {
                bins: [0; BINS],
                empty: true,
            };
        };
        let mut bins = self.0;
        let mut next = last;
        for s in 1..BINS {
            let i = (last + BINS - s) % BINS;
            if self.0[i] != EMPTY {
                next = i;
            } else {
                let t = (next + BINS - i) % BINS;
                bins[i] = (scramble(u64::from(self.0[next]) << 16 | t as u64) >> 32) as u32;
            }
        }
        Signature { bins, empty: false }
    }
}

/// A densified MinHash signature of one text (or a whole conversation).
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    bins: [u32; BINS],
    /// The text had no word at all.
    empty: bool,
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:08x}…, empty: {})", self.bins[0], self.empty)
    }
}

impl Signature {
    /// Estimated Jaccard similarity of the two texts' shingle sets (two empty texts: 1).
    pub fn estimate(&self, other: &Signature) -> f64 {
        match (self.empty, other.empty) {
            (true, true) => 1.0,
            (true, false) | (false, true) => 0.0,
            _ => {
                let same = self.bins.iter().zip(&other.bins).filter(|(a, b)| a == b);
                same.count() as f64 / BINS as f64
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.empty
    }
}

/// The signature of one text alone (what [`Key::semantic`] computes per message).
pub fn signature(text: &str) -> Signature {
    scan(text).raw.densify()
}

/// Estimated Jaccard similarity of two texts (word 3-shingles), by their signatures.
pub fn similarity(a: &str, b: &str) -> f64 {
    signature(a).estimate(&signature(b))
}

/// What one pass over a text yields.
struct Scanned {
    raw: Raw,
    /// Shingle hashes, in order (duplicates included), all of them if `complete`.
    shingles: Vec<u64>,
    complete: bool,
    /// The first and last [`ANCHOR_WORDS`] token hashes.
    anchors: Vec<u64>,
    /// The numbers skeleton: each digit run with the signs between, `|`-terminated.
    numbers: Vec<u8>,
}

/// The numbers of a text, as the frame sees them (see [`Numbers::ascii`]).
#[derive(Default)]
struct Numbers {
    out: Vec<u8>,
    piece: Vec<u8>,
    digit: bool,
    space: bool,
}

impl Numbers {
    /// A piece is a run of digits and arithmetic signs (`+-*/^%=<>.,()`) in which spaces are
    /// ignored (a space between two digits is kept as one: `17 23` is not `1723`); any other
    /// character ends it. Pieces with a digit are kept, trailing `.` and `,` trimmed
    /// (punctuation, not a number).
    #[inline]
    fn ascii(&mut self, c: u8) {
        match c {
            b'0'..=b'9' => self.digit(c),
            b'+' | b'-' | b'*' | b'/' | b'^' | b'%' | b'=' | b'<' | b'>' | b'.' | b',' | b'('
            | b')' => {
                self.space = false;
                self.piece.push(c);
            }
            b' ' | b'\t' | b'\n' | b'\r' => self.space = true,
            _ => self.other(),
        }
    }

    #[inline]
    fn digit(&mut self, c: u8) {
        if self.space && self.piece.last().is_some_and(u8::is_ascii_digit) {
            self.piece.push(b' ');
        }
        self.space = false;
        self.piece.push(c);
        self.digit = true;
    }

    /// A letter or digit run of a word token.
    #[inline]
    fn run(&mut self, run: &[u8]) {
        for &c in run {
            if c.is_ascii_digit() {
                self.digit(c);
            } else {
                self.other();
            }
        }
    }

    #[inline]
    fn other(&mut self) {
        if !self.piece.is_empty() {
            self.end();
        }
        self.space = false;
    }

    fn end(&mut self) {
        if self.digit {
            while matches!(self.piece.last(), Some(b'.' | b',')) {
                self.piece.pop();
            }
            self.out.extend_from_slice(&self.piece);
            self.out.push(b'|');
        }
        self.piece.clear();
        self.digit = false;
        self.space = false;
    }
}

/// Scripts written without spaces between words: each character is a token.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x0E00..=0x0E7F       // Thai
        | 0x2E80..=0x9FFF     // CJK radicals, kana, ideographs
        | 0xAC00..=0xD7AF     // Hangul syllables
        | 0xF900..=0xFAFF     // CJK compatibility ideographs
        | 0xFF66..=0xFF9F     // half-width kana
        | 0x20000..=0x3134F) // CJK extensions
}

/// Eight bytes of `b` (at least 8 long), little-endian.
#[inline]
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The low `k` bytes of a word (`k` ≤ 8).
#[inline]
fn low_bytes(k: usize) -> u64 {
    if k >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * k)) - 1
    }
}

const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
const LOW_7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const ONES: u64 = 0x0101_0101_0101_0101;
const CASE_BITS: u64 = 0x2020_2020_2020_2020;

/// Per byte of `x` (each byte < 0x80): the top bit set where the byte is in `lo..=hi`.
#[inline]
fn in_range(x: u64, lo: u8, hi: u8) -> u64 {
    // No carry crosses a byte: each byte stays below 0x80 + 0x80.
    let ge = x + ONES * u64::from(0x80 - lo);
    let gt = x + ONES * u64::from(0x7f - hi);
    ge & !gt & HIGH_BITS
}

/// The bytes of `w` that are ASCII digits (top bit of each such byte set).
#[inline]
fn digit_bytes(w: u64) -> u64 {
    in_range(w & LOW_7, b'0', b'9') & !w
}

/// The bytes of `w` that are ASCII letters or digits (top bit of each such byte set).
#[inline]
fn alnum_bytes(w: u64) -> u64 {
    let letters = in_range((w | CASE_BITS) & LOW_7, b'a', b'z');
    (letters | in_range(w & LOW_7, b'0', b'9')) & !w
}

/// The hash of a word token of 1 to 16 ASCII letters and digits given as two little-endian
/// words (bytes past `len` ignored): lower-cased in the word (`| 0x20` lower-cases an ASCII
/// letter and leaves a digit as it is) and scrambled with the length. Most words take this
/// path, found and hashed 8 bytes at a time, which is several times faster than copying each
/// word to lower-case it and hashing the copy.
#[inline]
fn word_hash(w0: u64, w1: u64, len: usize) -> u64 {
    let w0 = (w0 | CASE_BITS) & low_bytes(len);
    let w1 = (w1 | CASE_BITS) & low_bytes(len.saturating_sub(8));
    scramble(w0 ^ (w1 ^ (len as u64) << 59).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// [`word_hash`] of `src[start..start + len]` (`len` ≤ 16).
fn short_token(src: &[u8], start: usize, len: usize) -> u64 {
    let mut buf = [0u8; 16];
    buf[..len].copy_from_slice(&src[start..start + len]);
    word_hash(le64(&buf), le64(&buf[8..]), len)
}

/// The hash of a lower-cased word token: [`short_token`] for up to 16 ASCII letters and
/// digits (so a word hashes the same whichever way the tokenizer met it), XXH3 otherwise.
fn token_hash(tok: &[u8]) -> u64 {
    if tok.len() <= 16 && tok.iter().all(u8::is_ascii_alphanumeric) {
        short_token(tok, 0, tok.len())
    } else {
        xxh3_64(tok)
    }
}

/// The tokenizer's state: shingles over a sliding window of token hashes.
struct Tokens {
    raw: Raw,
    /// Shingle hashes, while at most `cap` of them.
    shingles: Vec<u64>,
    cap: usize,
    count: usize,
    prev: [u64; 2],
    head: [u64; ANCHOR_WORDS],
    tail: [u64; ANCHOR_WORDS],
}

impl Tokens {
    #[inline]
    fn push(&mut self, t: u64) {
        if self.count < ANCHOR_WORDS {
            self.head[self.count] = t;
        }
        self.tail[self.count % ANCHOR_WORDS] = t;
        if self.count >= SHINGLE_WORDS - 1 {
            self.add(shingle(self.prev[0], self.prev[1], t));
        }
        self.prev = [self.prev[1], t];
        self.count += 1;
    }

    #[inline]
    fn add(&mut self, h: u64) {
        self.raw.add(h);
        if self.shingles.len() <= self.cap {
            self.shingles.push(h);
        }
    }

    /// Ends the open word token, if any.
    #[inline]
    fn close(&mut self, tok: &mut Vec<u8>) {
        if !tok.is_empty() {
            self.push(token_hash(tok));
            tok.clear();
        }
    }
}

/// One pass over a text: word tokens, shingles, anchors and numbers. Shingle hashes are listed
/// only up to `cap` of them ([`Scanned::complete`] tells).
fn scan_with(text: &str, cap: usize) -> Scanned {
    let bytes = text.as_bytes();
    let n = bytes.len();
    let mut t = Tokens {
        raw: Raw::new(),
        shingles: Vec::with_capacity((n / 5 + 2).min(cap.saturating_add(1))),
        cap,
        count: 0,
        prev: [0; 2],
        head: [0; ANCHOR_WORDS],
        tail: [0; ANCHOR_WORDS],
    };
    let mut numbers = Numbers::default();
    // A token being collected: one with non-ASCII letters, or longer than 16 bytes.
    let mut tok: Vec<u8> = Vec::with_capacity(64);
    let mut i = 0;
    while i < n {
        let c = bytes[i];
        if c.is_ascii_alphanumeric() && tok.is_empty() && i + 16 <= n {
            // The usual word: found, checked for digits and hashed 8 bytes at a time.
            let w0 = le64(&bytes[i..]);
            let stop0 = !alnum_bytes(w0) & HIGH_BITS;
            let (len, w1) = if stop0 != 0 {
                (stop0.trailing_zeros() as usize / 8, 0)
            } else {
                let w1 = le64(&bytes[i + 8..]);
                let stop1 = !alnum_bytes(w1) & HIGH_BITS;
                (8 + stop1.trailing_zeros() as usize / 8, w1)
            };
            if len <= 16 && (i + len == n || bytes[i + len] < 0x80) {
                let digits = digit_bytes(w0) & low_bytes(len)
                    | digit_bytes(w1) & low_bytes(len.saturating_sub(8));
                if digits != 0 {
                    numbers.run(&bytes[i..i + len]);
                } else {
                    numbers.other();
                }
                t.push(word_hash(w0, w1, len));
                i += len;
                continue;
            }
        }
        if c.is_ascii_alphanumeric() {
            let start = i;
            let mut digits = false;
            while i < n && bytes[i].is_ascii_alphanumeric() {
                digits |= bytes[i].is_ascii_digit();
                i += 1;
            }
            let len = i - start;
            if digits {
                numbers.run(&bytes[start..i]);
            } else {
                numbers.other();
            }
            if tok.is_empty() && len <= 16 && (i == n || bytes[i] < 0x80) {
                t.push(short_token(bytes, start, len));
            } else {
                tok.extend(bytes[start..i].iter().map(u8::to_ascii_lowercase));
                if i == n || bytes[i] < 0x80 {
                    t.close(&mut tok);
                }
            }
        } else if c < 0x80 {
            t.close(&mut tok);
            numbers.ascii(c);
            i += 1;
        } else {
            let Some(ch) = text[i..].chars().next() else {
                break;
            };
            numbers.other();
            let mut b = [0u8; 4];
            if is_cjk(ch) {
                t.close(&mut tok);
                t.push(token_hash(ch.encode_utf8(&mut b).as_bytes()));
            } else if ch.is_alphanumeric() {
                for l in ch.to_lowercase() {
                    tok.extend_from_slice(l.encode_utf8(&mut b).as_bytes());
                }
            } else {
                t.close(&mut tok);
            }
            i += ch.len_utf8();
        }
    }
    t.close(&mut tok);
    numbers.end();
    // Short texts: their words stand for shingles.
    if t.count < SHINGLE_WORDS {
        for k in 0..t.count {
            t.add(single(t.head[k]));
        }
    }
    let first = t.count.min(ANCHOR_WORDS);
    let mut anchors = t.head[..first].to_vec();
    let last = t.count.min(ANCHOR_WORDS);
    anchors.extend((t.count - last..t.count).map(|k| t.tail[k % ANCHOR_WORDS]));
    Scanned {
        complete: t.shingles.len() <= cap,
        raw: t.raw,
        shingles: t.shingles,
        anchors,
        numbers: numbers.out,
    }
}

/// [`scan_with`] listing shingles only while few enough for an exact set to be likely.
fn scan(text: &str) -> Scanned {
    scan_with(text, 4 * SMALL_SET)
}

/// A text's sketch, anchors and numbers from one pass (two for a long text with few distinct
/// shingles).
fn sketch_text(text: &str) -> (TextSketch, Vec<u64>, Vec<u8>) {
    let mut s = scan(text);
    if !s.complete && s.raw.filled() < BINS / 2 {
        // Long but repetitive: few distinct shingles, so list them all to find out.
        s = scan_with(text, usize::MAX);
    }
    let sketch = TextSketch::of(s.raw, s.complete.then_some(s.shingles));
    (sketch, s.anchors, s.numbers)
}

/// One text's sketch: its signature, and its exact shingle set when small.
#[derive(Debug, Clone)]
struct TextSketch {
    raw: Raw,
    sig: Signature,
    /// Sorted distinct shingle hashes, when at most [`SMALL_SET`].
    set: Option<Vec<u64>>,
}

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Raw({} filled)", self.filled())
    }
}

impl TextSketch {
    /// The sketch of a text from its raw bins and, when known, all its shingle hashes.
    fn of(raw: Raw, shingles: Option<Vec<u64>>) -> Self {
        let set = shingles.and_then(|mut s| {
            s.sort_unstable();
            s.dedup();
            (s.len() <= SMALL_SET).then_some(s)
        });
        Self {
            sig: raw.densify(),
            raw,
            set,
        }
    }

    /// The stored form: `s` + 16 hex digits per shingle of the exact set, or `m` + 4 hex digits
    /// per bin (the low 16 bits of each densified bin; a random agreement of 1 in 65 536 is
    /// negligible).
    fn encode(&self) -> String {
        match &self.set {
            Some(set) => {
                let mut s = String::with_capacity(1 + 16 * set.len());
                s.push('s');
                for &h in set {
                    push_hex(&mut s, h, 16);
                }
                s
            }
            None => {
                let mut s = String::with_capacity(1 + 4 * BINS);
                s.push('m');
                for &b in &self.sig.bins {
                    push_hex(&mut s, u64::from(b as u16), 4);
                }
                s
            }
        }
    }

    /// Similarity with a stored sketch: exact where both sets are known, else estimated.
    fn similarity(&self, stored: &Stored) -> f64 {
        match (stored, &self.set) {
            (Stored::Set(a), Some(b)) => jaccard(a, b),
            (Stored::Set(a), None) => {
                let mut raw = Raw::new();
                for &h in a {
                    raw.add(h);
                }
                raw.densify().estimate(&self.sig)
            }
            (Stored::Bins(bins), _) => {
                if self.sig.empty {
                    return 0.0;
                }
                let same = bins
                    .iter()
                    .zip(&self.sig.bins)
                    .filter(|(a, b)| **a == **b as u16);
                same.count() as f64 / BINS as f64
            }
        }
    }
}

/// A stored sketch, decoded.
enum Stored {
    Set(Vec<u64>),
    Bins(Vec<u16>),
}

impl Stored {
    fn decode(s: &str) -> Option<Self> {
        let (kind, digits) = s.split_at_checked(1)?;
        match kind {
            "s" if digits.len() % 16 == 0 => (0..digits.len() / 16)
                .map(|i| u64::from_str_radix(digits.get(16 * i..16 * i + 16)?, 16).ok())
                .collect::<Option<Vec<_>>>()
                .map(Stored::Set),
            "m" if digits.len() == 4 * BINS => (0..BINS)
                .map(|i| u16::from_str_radix(digits.get(4 * i..4 * i + 4)?, 16).ok())
                .collect::<Option<Vec<_>>>()
                .map(Stored::Bins),
            _ => None,
        }
    }
}

/// Exact Jaccard similarity of two sorted sets (two empty sets: 1).
fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    common as f64 / (a.len() + b.len() - common) as f64
}

/// A request's semantic identity: the frame (what must be identical) and the sketches of each
/// message and of the whole conversation.
#[derive(Debug, Clone)]
pub struct Semantic {
    frame: [u8; 16],
    messages: Vec<TextSketch>,
    whole: TextSketch,
}

impl Semantic {
    fn of(scope: &Scope, params: &[u8], messages: &[Value]) -> Self {
        let mut frame = Xxh3::new();
        let mut put = |bytes: &[u8]| {
            frame.update(&(bytes.len() as u64).to_le_bytes());
            frame.update(bytes);
        };
        put(b"freerelay cache frame v1");
        put(scope.tenant.as_bytes());
        put(scope.model.as_bytes());
        put(params);
        put(&(messages.len() as u64).to_le_bytes());
        let mut sketches = Vec::with_capacity(messages.len());
        let mut whole_raw = Raw::new();
        let mut whole_set: Option<Vec<u64>> = Some(Vec::new());
        for m in messages {
            let (text, residue) = split_message(m);
            let (sketch, anchors, numbers) = sketch_text(&text);
            put(residue.as_slice());
            put(&numbers);
            let anchors: Vec<u8> = anchors.iter().flat_map(|a| a.to_le_bytes()).collect();
            put(&anchors);
            whole_raw.merge(&sketch.raw);
            whole_set = match (whole_set, &sketch.set) {
                (Some(mut w), Some(set)) if w.len() + set.len() <= 4 * SMALL_SET => {
                    w.extend_from_slice(set);
                    Some(w)
                }
                _ => None,
            };
            sketches.push(sketch);
        }
        let whole_set = whole_set.and_then(|mut w| {
            w.sort_unstable();
            w.dedup();
            (w.len() <= SMALL_SET).then_some(w)
        });
        Self {
            frame: frame.digest128().to_le_bytes(),
            messages: sketches,
            whole: TextSketch {
                sig: whole_raw.densify(),
                raw: whole_raw,
                set: whole_set,
            },
        }
    }

    /// The frame in hex: scope, parameters, roles, non-text content, numbers and anchors.
    pub fn frame_hex(&self) -> String {
        hex(&self.frame)
    }

    /// The whole conversation's signature.
    pub fn signature(&self) -> &Signature {
        &self.whole.sig
    }

    /// The LSH buckets of this conversation, one per band: its band's [`ROWS`] bins and the
    /// frame, hashed to 16 bits.
    pub fn buckets(&self) -> [u16; BANDS] {
        let mut out = [0u16; BANDS];
        for (band, b) in out.iter_mut().enumerate() {
            let mut bytes = [0u8; 16 + 8 + 4 * ROWS];
            bytes[..16].copy_from_slice(&self.frame);
            bytes[16..24].copy_from_slice(&(band as u64).to_le_bytes());
            for (r, v) in self.whole.sig.bins[band * ROWS..(band + 1) * ROWS]
                .iter()
                .enumerate()
            {
                bytes[24 + 4 * r..28 + 4 * r].copy_from_slice(&v.to_le_bytes());
            }
            *b = (xxh3_64(&bytes) >> 48) as u16;
        }
        out
    }

    /// The bucket keys, in band order ([`bucket_key`]).
    pub fn bucket_keys(&self) -> Vec<String> {
        self.buckets()
            .iter()
            .enumerate()
            .map(|(band, &b)| bucket_key(band, b))
            .collect()
    }

    fn stored(&self) -> StoredSemantic {
        StoredSemantic {
            frame: self.frame_hex(),
            whole: self.whole.encode(),
            messages: self.messages.iter().map(TextSketch::encode).collect(),
        }
    }

    /// The lowest similarity among the whole conversation and each message, or `None` as soon
    /// as one falls below `threshold` (or the stored sketch does not fit this request).
    fn similarity(&self, stored: &StoredSemantic, threshold: f64) -> Option<f64> {
        if stored.frame != self.frame_hex() || stored.messages.len() != self.messages.len() {
            return None;
        }
        let whole = self.whole.similarity(&Stored::decode(&stored.whole)?);
        let mut least = whole;
        if least < threshold {
            return None;
        }
        for (mine, theirs) in self.messages.iter().zip(&stored.messages) {
            let s = mine.similarity(&Stored::decode(theirs)?);
            if s < threshold {
                return None;
            }
            least = least.min(s);
        }
        Some(least)
    }
}

// ---------------------------------------------------------------------------------------------
// Entries

/// A cached answer: everything needed to replay it as JSON or as a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Catalogue id of the provider that answered.
    pub provider: String,
    /// The model as the answer named it.
    pub model: String,
    /// The assistant message object (`content`, and `reasoning_content`, `refusal`,
    /// `tool_calls`… when present).
    pub message: Map<String, Value>,
    pub finish_reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// When the answer was first made (Unix seconds).
    pub created: u64,
}

impl Answer {
    /// The answer of an OpenAI `chat.completion` body with exactly one choice.
    pub fn from_completion(body: &[u8], provider: &str) -> Option<Self> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let [choice] = v.get("choices")?.as_array()?.as_slice() else {
            return None;
        };
        let usage = Usage::from_object(&v).unwrap_or_default();
        Some(Self {
            provider: provider.to_owned(),
            model: v
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            message: choice.get("message")?.as_object()?.clone(),
            finish_reason: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("stop")
                .to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            created: v.get("created").and_then(Value::as_u64).unwrap_or(0),
        })
    }

    /// A plain text answer (e.g. collected from a stream).
    pub fn text(
        provider: &str,
        model: &str,
        content: &str,
        finish_reason: &str,
        usage: Usage,
        created: u64,
    ) -> Self {
        let mut message = Map::new();
        message.insert("role".into(), "assistant".into());
        message.insert("content".into(), content.into());
        Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
            message,
            finish_reason: finish_reason.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            created,
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }
}

/// What the semantic check needs of an entry (present when stored under [`Mode::Semantic`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSemantic {
    /// The frame hash, hex (see [`Semantic::frame_hex`]).
    pub frame: String,
    /// The whole conversation's sketch (`s…` exact set or `m…` bins).
    pub whole: String,
    /// Each message's sketch, in order.
    pub messages: Vec<String>,
}

/// One cached entry, as stored (JSON) under `cache:v1:entry:<slot>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Encoding version (1).
    pub v: u32,
    pub scope: Scope,
    /// The exact hash of the request it answers, hex.
    pub hash: String,
    pub roles: Vec<String>,
    pub stored_ms: u64,
    /// Readers ignore the entry from this time on (Unix ms).
    pub expires_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<StoredSemantic>,
    pub answer: Answer,
}

/// [`Entry`] by reference, for encoding without copying the answer.
#[derive(Serialize)]
struct EntryRef<'a> {
    v: u32,
    scope: &'a Scope,
    hash: &'a str,
    roles: &'a [String],
    stored_ms: u64,
    expires_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    semantic: Option<StoredSemantic>,
    answer: &'a Answer,
}

/// Why a store wrote nothing (or not everything); for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// The encoded entry is larger than [`MAX_ENTRY_BYTES`]: nothing was written.
    TooLarge {
        bytes: usize,
        max: usize,
    },
    Kv(KvError),
    Encode(String),
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::TooLarge { bytes, max } => {
                write!(f, "cache: entry of {bytes} bytes is larger than {max}")
            }
            CacheError::Kv(e) => write!(f, "cache: {e}"),
            CacheError::Encode(e) => write!(f, "cache: cannot encode the entry: {e}"),
        }
    }
}

impl std::error::Error for CacheError {}

impl From<KvError> for CacheError {
    fn from(e: KvError) -> Self {
        CacheError::Kv(e)
    }
}

/// Where a store put its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreReceipt {
    pub slot: u64,
    pub generation: u64,
    /// Encoded entry size.
    pub bytes: usize,
    /// Keys the entry takes (head + chunks).
    pub parts: usize,
}

/// Splits an encoded entry into the head value and chunk values.
fn split(blob: &[u8], generation: u64) -> Vec<Vec<u8>> {
    let first = blob.len().min(CHUNK_BYTES - HEAD_LEN);
    let rest = &blob[first..];
    let chunks = rest.len().div_ceil(CHUNK_BYTES - CHUNK_HEAD_LEN);
    let mut head = Vec::with_capacity(HEAD_LEN + first);
    head.extend_from_slice(HEAD_MAGIC);
    head.extend_from_slice(&generation.to_le_bytes());
    head.extend_from_slice(&(chunks as u16).to_le_bytes());
    head.extend_from_slice(&(blob.len() as u32).to_le_bytes());
    head.extend_from_slice(&xxh3_64(blob).to_le_bytes());
    head.extend_from_slice(&blob[..first]);
    let mut parts = vec![head];
    for c in rest.chunks(CHUNK_BYTES - CHUNK_HEAD_LEN) {
        let mut v = Vec::with_capacity(CHUNK_HEAD_LEN + c.len());
        v.extend_from_slice(&generation.to_le_bytes());
        v.extend_from_slice(c);
        parts.push(v);
    }
    parts
}

/// A head value, parsed.
struct Head<'a> {
    generation: u64,
    chunks: usize,
    total: usize,
    digest: u64,
    data: &'a [u8],
}

impl<'a> Head<'a> {
    fn parse(v: &'a [u8]) -> Option<Self> {
        if v.len() < HEAD_LEN || &v[..4] != HEAD_MAGIC {
            return None;
        }
        let chunks = usize::from(u16::from_le_bytes(v[12..14].try_into().ok()?));
        (chunks <= MAX_CHUNKS).then_some(())?;
        Some(Self {
            generation: u64::from_le_bytes(v[4..12].try_into().ok()?),
            chunks,
            total: u32::from_le_bytes(v[14..18].try_into().ok()?) as usize,
            digest: u64::from_le_bytes(v[18..26].try_into().ok()?),
            data: &v[HEAD_LEN..],
        })
    }
}

/// A pointer to a slot, as the index and the buckets store it: `<slot>:<generation>`, and
/// `:<hash hex>` in the exact index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pointer<'a> {
    slot: u64,
    generation: u64,
    hash: Option<&'a str>,
}

impl<'a> Pointer<'a> {
    fn parse(v: &'a [u8]) -> Option<Self> {
        let s = std::str::from_utf8(v).ok()?;
        let mut it = s.splitn(3, ':');
        Some(Self {
            slot: it.next()?.parse().ok()?,
            generation: it.next()?.parse().ok()?,
            hash: it.next(),
        })
    }
}

/// Reads the entry a pointer names, given its head value: `None` (a miss) if the slot has been
/// rewritten since, a chunk is missing or from another write, or the bytes do not check out.
fn read_entry(
    kv: &(impl Kv + ?Sized),
    slot: u64,
    generation: u64,
    head: Option<&[u8]>,
) -> KvResult<Option<Entry>> {
    let Some(head) = head.and_then(Head::parse) else {
        return Ok(None);
    };
    if head.generation != generation {
        return Ok(None);
    }
    let blob: Cow<'_, [u8]> = if head.chunks == 0 {
        Cow::Borrowed(head.data)
    } else {
        let keys: Vec<String> = (1..=head.chunks).map(|i| chunk_key(slot, i)).collect();
        let mut blob = Vec::with_capacity(head.total);
        blob.extend_from_slice(head.data);
        for v in kv.get_many(&keys)? {
            match v {
                Some(v)
                    if v.len() >= CHUNK_HEAD_LEN
                        && v[..CHUNK_HEAD_LEN] == generation.to_le_bytes() =>
                {
                    blob.extend_from_slice(&v[CHUNK_HEAD_LEN..])
                }
                _ => return Ok(None),
            }
        }
        Cow::Owned(blob)
    };
    if blob.len() != head.total || xxh3_64(&blob) != head.digest {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<Entry>(&blob)
        .ok()
        .filter(|e| e.v == 1))
}

// ---------------------------------------------------------------------------------------------
// Lookups and stores

/// How a hit was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HitKind {
    Exact,
    Semantic,
}

/// An answer found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub kind: HitKind,
    /// 1 for an exact hit; for a semantic one, the lowest similarity among the whole
    /// conversation and each message (the figure that passed the threshold).
    pub similarity: f64,
    pub entry: Entry,
}

impl Hit {
    /// The counter this hit increments.
    pub fn counter(&self) -> Counter {
        match self.kind {
            HitKind::Exact => Counter::HitsExact,
            HitKind::Semantic => Counter::HitsSemantic,
        }
    }
}

/// The exact lookup from the index value (read by the caller, e.g. in its batched state read
/// of [`index_key`]): reads the entry (one `get`, plus one `get_many` for a chunked entry) and
/// checks its hash, scope and expiry.
pub fn exact_from(
    index: Option<&[u8]>,
    kv: &(impl Kv + ?Sized),
    key: &Key,
    now_ms: u64,
) -> KvResult<Option<Hit>> {
    let Some(p) = index.and_then(Pointer::parse) else {
        return Ok(None);
    };
    if p.hash != Some(key.hash_hex()) {
        return Ok(None);
    }
    let head = kv.get(&entry_key(p.slot))?;
    let Some(entry) = read_entry(kv, p.slot, p.generation, head.as_deref())? else {
        return Ok(None);
    };
    let fits = entry.hash == key.hash_hex && entry.scope == key.scope && entry.expires_ms > now_ms;
    Ok(fits.then_some(Hit {
        kind: HitKind::Exact,
        similarity: 1.0,
        entry,
    }))
}

/// The exact lookup: reads the index key, then [`exact_from`].
pub fn lookup_exact(kv: &(impl Kv + ?Sized), key: &Key, now_ms: u64) -> KvResult<Option<Hit>> {
    let index = kv.get(&index_key(key))?;
    exact_from(index.as_deref(), kv, key, now_ms)
}

/// The semantic lookup from the bucket values (of `key.semantic().bucket_keys()`, in order):
/// reads the candidate entries in one `get_many` and returns the most similar one that passes
/// every check (see the module doc). `None` unless `policy.mode` is [`Mode::Semantic`].
pub fn semantic_from(
    buckets: &[Option<Vec<u8>>],
    kv: &(impl Kv + ?Sized),
    key: &Key,
    policy: &Policy,
    now_ms: u64,
) -> KvResult<Option<Hit>> {
    if policy.mode != Mode::Semantic {
        return Ok(None);
    }
    let mut candidates: Vec<(u64, u64)> = Vec::with_capacity(BANDS);
    for p in buckets.iter().flatten().filter_map(|v| Pointer::parse(v)) {
        if !candidates.contains(&(p.slot, p.generation)) {
            candidates.push((p.slot, p.generation));
        }
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    let heads = kv.get_many(
        &candidates
            .iter()
            .map(|&(slot, _)| entry_key(slot))
            .collect::<Vec<_>>(),
    )?;
    let sem = key.semantic();
    let mut best: Option<Hit> = None;
    for (&(slot, generation), head) in candidates.iter().zip(&heads) {
        let Some(entry) = read_entry(kv, slot, generation, head.as_deref())? else {
            continue;
        };
        if entry.expires_ms <= now_ms || entry.scope != key.scope || entry.roles != key.roles {
            continue;
        }
        let Some(s) = entry
            .semantic
            .as_ref()
            .and_then(|st| sem.similarity(st, policy.threshold))
        else {
            continue;
        };
        if best.as_ref().is_none_or(|b| s > b.similarity) {
            best = Some(Hit {
                kind: HitKind::Semantic,
                similarity: s,
                entry,
            });
        }
    }
    Ok(best)
}

/// The semantic lookup: the [`BANDS`] bucket keys in one `get_many`, then [`semantic_from`].
pub fn lookup_semantic(
    kv: &(impl Kv + ?Sized),
    key: &Key,
    policy: &Policy,
    now_ms: u64,
) -> KvResult<Option<Hit>> {
    if policy.mode != Mode::Semantic {
        return Ok(None);
    }
    let buckets = kv.get_many(&key.semantic().bucket_keys())?;
    semantic_from(&buckets, kv, key, policy, now_ms)
}

/// Stores `answer` for `key`: one increment of [`NEXT_KEY`] for the slot, then one `set_many`
/// of the entry's chunks and head, the exact index and (under [`Mode::Semantic`]) the [`BANDS`]
/// buckets. `Ok(None)` under [`Mode::Off`]; [`CacheError::TooLarge`] (nothing written) for an
/// entry over [`MAX_ENTRY_BYTES`].
pub fn store(
    kv: &(impl Kv + ?Sized),
    key: &Key,
    answer: &Answer,
    policy: &Policy,
    now_ms: u64,
) -> Result<Option<StoreReceipt>, CacheError> {
    if policy.mode == Mode::Off {
        return Ok(None);
    }
    let semantic = (policy.mode == Mode::Semantic).then(|| key.semantic());
    let entry = EntryRef {
        v: 1,
        scope: &key.scope,
        hash: &key.hash_hex,
        roles: &key.roles,
        stored_ms: now_ms,
        expires_ms: now_ms.saturating_add(policy.ttl_ms),
        semantic: semantic.map(Semantic::stored),
        answer,
    };
    let blob = serde_json::to_vec(&entry).map_err(|e| CacheError::Encode(e.to_string()))?;
    if blob.len() > MAX_ENTRY_BYTES {
        return Err(CacheError::TooLarge {
            bytes: blob.len(),
            max: MAX_ENTRY_BYTES,
        });
    }
    let generation = kv.increment(NEXT_KEY, 1)?;
    let generation = u64::try_from(generation)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| KvError(format!("{NEXT_KEY}: {generation} is not a generation")))?;
    let slot = (generation - 1) % policy.ring();
    let parts = split(&blob, generation);
    let n_parts = parts.len();
    // One batch: chunks before the head (a store that writes them in order never shows a head
    // without its chunks; a reader checks the generation and digest anyway), then the pointers.
    let mut writes: Vec<(String, Vec<u8>)> = Vec::with_capacity(n_parts + 1 + BANDS);
    let mut parts = parts.into_iter();
    let head = parts.next().unwrap_or_default();
    writes.extend(parts.enumerate().map(|(i, p)| (chunk_key(slot, i + 1), p)));
    writes.push((entry_key(slot), head));
    writes.push((
        index_key(key),
        format!("{slot}:{generation}:{}", key.hash_hex).into_bytes(),
    ));
    if let Some(sem) = semantic {
        let pointer = format!("{slot}:{generation}");
        writes.extend(
            sem.bucket_keys()
                .into_iter()
                .map(|k| (k, pointer.clone().into_bytes())),
        );
    }
    kv.set_many(&writes)?;
    Ok(Some(StoreReceipt {
        slot,
        generation,
        bytes: blob.len(),
        parts: n_parts,
    }))
}

/// The cache's counters, `stats:v1:cache:<field>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    HitsExact,
    HitsSemantic,
    Misses,
    Stores,
    TooLarge,
}

impl Counter {
    pub const ALL: [Counter; 5] = [
        Counter::HitsExact,
        Counter::HitsSemantic,
        Counter::Misses,
        Counter::Stores,
        Counter::TooLarge,
    ];

    pub fn field(self) -> &'static str {
        match self {
            Counter::HitsExact => "hits_exact",
            Counter::HitsSemantic => "hits_semantic",
            Counter::Misses => "misses",
            Counter::Stores => "stores",
            Counter::TooLarge => "too_large",
        }
    }

    /// The counter's key, `stats:v1:cache:<field>`.
    pub fn key(self) -> String {
        keys::stat("cache", self.field())
    }

    /// The increment for the component to perform.
    pub fn op(self) -> KvOp {
        KvOp::Increment {
            key: self.key(),
            delta: 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay

/// The answer's usage as it was counted when it was made, and `cost` 0: a replay costs nothing
/// (the same field priced answers carry, so clients summing it stay right).
fn usage_json(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens.saturating_add(a.completion_tokens),
        "cost": 0,
    })
}

/// The entry as an OpenAI `chat.completion` body, with its own `id` and `created`.
pub fn render_json(entry: &Entry, id: &str, created: u64) -> Vec<u8> {
    let a = &entry.answer;
    let mut message = a.message.clone();
    message.insert("role".into(), "assistant".into());
    message.entry("content").or_insert(Value::Null);
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": a.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": a.finish_reason,
        }],
        "usage": usage_json(a),
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Splits `s` into pieces of at most [`SSE_PIECE_BYTES`] (at character boundaries).
fn pieces(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(SSE_PIECE_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// The entry as an OpenAI stream of `chat.completion.chunk` events: the role first, then the
/// reasoning, the content (in pieces of at most [`SSE_PIECE_BYTES`]), a refusal and tool calls
/// when present, the finish reason, the usage chunk when `include_usage` (other chunks then carry
/// `"usage": null`, as OpenAI sends them), and `data: [DONE]`.
pub fn render_sse(entry: &Entry, id: &str, created: u64, include_usage: bool) -> Vec<u8> {
    let a = &entry.answer;
    let m = &a.message;
    let text_len: usize = m.values().filter_map(Value::as_str).map(str::len).sum();
    let mut out = Vec::with_capacity(text_len + text_len / 8 + 1024);
    let mut event = |choices: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": a.model,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut out, &c);
        out.extend_from_slice(b"\n\n");
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    event(
        choice(json!({"role": "assistant", "content": ""}), Value::Null),
        None,
    );
    for field in ["reasoning_content", "reasoning", "content"] {
        if let Some(text) = m.get(field).and_then(Value::as_str) {
            for p in pieces(text) {
                event(choice(json!({ field: p }), Value::Null), None);
            }
        }
    }
    if let Some(r) = m.get("refusal").filter(|r| r.is_string()) {
        event(choice(json!({ "refusal": r }), Value::Null), None);
    }
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                if let Some(o) = c.as_object_mut() {
                    o.entry("index").or_insert(json!(i));
                }
                c
            })
            .collect();
        if !calls.is_empty() {
            event(choice(json!({ "tool_calls": calls }), Value::Null), None);
        }
    }
    event(choice(json!({}), json!(a.finish_reason)), None);
    if include_usage {
        event(json!([]), Some(usage_json(a)));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends the low `digits` hex digits of `v`, most significant first.
fn push_hex(s: &mut String, v: u64, digits: u32) {
    for i in (0..digits).rev() {
        s.push(char::from(HEX[(v >> (4 * i)) as usize & 15]));
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        push_hex(&mut s, u64::from(b), 2);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{testing, MemKv};
    use std::cell::Cell;

    const NOW: u64 = 1_750_000_000_000;

    fn req(v: Value) -> ChatRequest {
        ChatRequest::parse(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    /// A deterministic chat request with these messages (`(role, content)`).
    fn chat(messages: &[(&str, &str)]) -> ChatRequest {
        let ms: Vec<Value> = messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect();
        req(json!({"model": "auto", "temperature": 0, "messages": ms}))
    }

    fn scope() -> Scope {
        Scope::new("tenant-a", "auto")
    }

    fn answer(content: &str) -> Answer {
        Answer::text(
            "groq",
            "llama-3.1-8b-instant",
            content,
            "stop",
            Usage {
                prompt_tokens: 12,
                completion_tokens: 34,
            },
            1_700_000_000,
        )
    }

    fn content(hit: &Option<Hit>) -> Option<&str> {
        hit.as_ref()?.entry.answer.message.get("content")?.as_str()
    }

    fn put(kv: &MemKv, r: &ChatRequest, s: Scope, text: &str, policy: &Policy) {
        store(kv, &Key::of(r, s), &answer(text), policy, NOW)
            .unwrap()
            .unwrap();
    }

    fn exact(kv: &MemKv, r: &ChatRequest, s: Scope, now: u64) -> Option<Hit> {
        lookup_exact(kv, &Key::of(r, s), now).unwrap()
    }

    fn semantic(kv: &MemKv, r: &ChatRequest, s: Scope) -> Option<Hit> {
        lookup_semantic(kv, &Key::of(r, s), &Policy::default(), NOW).unwrap()
    }

    /// About 180 words of varied prose, numbers-free.
    const PARAGRAPH: &str = "The old lighthouse keeper climbed the spiral staircase every evening \
        just before sunset, carrying a small brass lantern and a notebook bound in faded green \
        leather. He recorded the colour of the sky, the direction of the wind, the shapes of the \
        clouds drifting over the harbour, and the names of the fishing boats returning with their \
        catch. Over many years the notebook filled with careful handwriting, sketches of gulls, \
        pressed flowers from the cliffs, and short poems about storms that never quite arrived. \
        Visitors from the village sometimes asked why he kept such detailed records when nobody \
        would ever read them, and he would only smile and point at the horizon, where the light \
        changed a little differently each night. After he retired, the harbour master found the \
        notebooks stacked neatly in a wooden chest beneath the lamp room, together with a letter \
        asking that they be given to the school so that children could learn how patient \
        attention turns ordinary days into something worth remembering. Please summarise this \
        story for a young reader and explain what the keeper valued most.";

    #[test]
    fn exact_hit_through_the_index_and_the_batched_read() {
        let kv = MemKv::default();
        let r = chat(&[("system", "Be terse."), ("user", "Name a prime number.")]);
        assert_eq!(exact(&kv, &r, scope(), NOW), None);
        let receipt = store(
            &kv,
            &Key::of(&r, scope()),
            &answer("7"),
            &Policy::default(),
            NOW,
        )
        .unwrap()
        .unwrap();
        assert_eq!((receipt.slot, receipt.generation, receipt.parts), (0, 1, 1));
        let hit = exact(&kv, &r, scope(), NOW + 1).unwrap();
        assert_eq!(hit.kind, HitKind::Exact);
        assert_eq!(hit.similarity, 1.0);
        assert_eq!(hit.entry.answer, answer("7"));
        assert_eq!(hit.entry.scope, scope());
        assert_eq!(hit.entry.roles, ["system", "user"]);
        assert_eq!(hit.counter(), Counter::HitsExact);
        // The same through the gateway's batched read of the index key.
        let key = Key::of(&r, scope());
        let index = kv.get(&index_key(&key)).unwrap();
        assert!(index_key(&key).starts_with("cache:v1:x:") && index_key(&key).len() == 15);
        let again = exact_from(index.as_deref(), &kv, &key, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(again, hit);
        assert_eq!(exact_from(None, &kv, &key, NOW).unwrap(), None);
        // An identical request is also a semantic hit, with similarity 1.
        let s = semantic(&kv, &r, scope()).unwrap();
        assert_eq!((s.kind, s.similarity), (HitKind::Semantic, 1.0));
    }

    #[test]
    fn tenants_and_model_choices_never_share_entries() {
        let kv = MemKv::default();
        let r = chat(&[("user", PARAGRAPH)]);
        put(&kv, &r, scope(), "for A", &Policy::default());
        for other in [
            Scope::new("tenant-b", "auto"),
            Scope::new("tenant-a", "groq/x"),
        ] {
            assert_eq!(exact(&kv, &r, other.clone(), NOW), None, "{other:?}");
            assert_eq!(semantic(&kv, &r, other.clone()), None, "{other:?}");
        }
        assert_eq!(content(&exact(&kv, &r, scope(), NOW)), Some("for A"));
        // B's own entry is B's alone.
        put(
            &kv,
            &r,
            Scope::new("tenant-b", "auto"),
            "for B",
            &Policy::default(),
        );
        assert_eq!(content(&exact(&kv, &r, scope(), NOW)), Some("for A"));
        assert_eq!(content(&semantic(&kv, &r, scope())), Some("for A"));
        let b = Scope::new("tenant-b", "auto");
        assert_eq!(content(&exact(&kv, &r, b.clone(), NOW)), Some("for B"));
        assert_eq!(content(&semantic(&kv, &r, b)), Some("for B"));
        // The tenant string is delimited: ("ab", "c") is not ("a", "bc").
        let k1 = Key::of(&r, Scope::new("ab", "c"));
        let k2 = Key::of(&r, Scope::new("a", "bc"));
        assert_ne!(k1.hash(), k2.hash());
    }

    fn base() -> Value {
        json!({
            "model": "auto",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Name a prime number."}
            ]
        })
    }

    fn hash_of(v: Value) -> [u8; 32] {
        *Key::of(&req(v), scope()).hash()
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = base();
        v[field] = value;
        v
    }

    #[test]
    fn fields_that_do_not_change_the_answer_are_ignored() {
        let h = hash_of(base());
        let same = [
            with("stream", json!(true)),
            with("stream_options", json!({"include_usage": true})),
            with("user", json!("someone")),
            with("metadata", json!({"trace": "x"})),
            with("store", json!(true)),
            with("service_tier", json!("auto")),
            with("prompt_cache_key", json!("k")),
            with("top_p", Value::Null),
            with("temperature", json!(0.0)),
            // Gateway-only fields never reach the body.
            with("models", json!(["groq/a"])),
        ];
        for v in same {
            assert_eq!(hash_of(v.clone()), h, "{v}");
        }
        // Key order, a single text part for a string, null members of a message.
        let reordered: Value = serde_json::from_str(
            r#"{"messages":[{"content":"Be terse.","role":"system"},{"content":[{"text":"Name a prime number.","type":"text"}],"role":"user","name":null}],"temperature":0,"model":"auto"}"#,
        )
        .unwrap();
        assert_eq!(hash_of(reordered), h);
    }

    #[test]
    fn fields_that_change_the_answer_are_not() {
        let h = hash_of(base());
        let different = [
            with("temperature", json!(0.5)),
            with("top_p", json!(0.9)),
            with("seed", json!(7)),
            with("max_tokens", json!(10)),
            with("max_completion_tokens", json!(10)),
            with("stop", json!(["\n"])),
            with("response_format", json!({"type": "json_object"})),
            with("n", json!(1)),
            with("presence_penalty", json!(0.5)),
            with("frequency_penalty", json!(0.5)),
            with("logit_bias", json!({"42": -100})),
            with("reasoning_effort", json!("high")),
            with("tool_choice", json!("none")),
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            with("x_vendor_knob", json!(1)),
            with(
                "messages",
                json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime number!"}]),
            ),
            with(
                "messages",
                json!([{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Name a prime number."}]),
            ),
            with(
                "messages",
                json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime number.", "name": "bob"}]),
            ),
            // Two text parts are not merged into one string.
            with(
                "messages",
                json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": [{"type": "text", "text": "Name a prime"}, {"type": "text", "text": " number."}]}]),
            ),
        ];
        for v in different {
            assert_ne!(hash_of(v.clone()), h, "{v}");
        }
    }

    #[test]
    fn a_paraphrase_of_a_long_prompt_is_a_semantic_hit() {
        let kv = MemKv::default();
        let r = chat(&[("system", "You are a kind teacher."), ("user", PARAGRAPH)]);
        put(
            &kv,
            &r,
            scope(),
            "A keeper who valued attention.",
            &Policy::default(),
        );
        // One word changed in the middle, and case and punctuation changes.
        let changed = PARAGRAPH
            .replace("sketches of gulls", "sketches of terns")
            .replace("Visitors from the village", "visitors, from the village");
        assert_ne!(changed, PARAGRAPH);
        let p = chat(&[("system", "You are a kind teacher!"), ("user", &changed)]);
        assert_eq!(exact(&kv, &p, scope(), NOW), None);
        let hit = semantic(&kv, &p, scope()).expect("a semantic hit");
        assert_eq!(hit.kind, HitKind::Semantic);
        assert_eq!(hit.counter(), Counter::HitsSemantic);
        assert!(
            hit.similarity >= DEFAULT_THRESHOLD && hit.similarity < 1.0,
            "{}",
            hit.similarity
        );
        assert_eq!(content(&Some(hit)), Some("A keeper who valued attention."));
        // A stricter threshold refuses it; Exact mode never looks.
        let key = Key::of(&p, scope());
        let strict = Policy {
            threshold: 0.99,
            ..Policy::default()
        };
        assert_eq!(lookup_semantic(&kv, &key, &strict, NOW).unwrap(), None);
        let exact_only = Policy {
            mode: Mode::Exact,
            ..Policy::default()
        };
        assert_eq!(lookup_semantic(&kv, &key, &exact_only, NOW).unwrap(), None);
    }

    #[test]
    fn a_short_question_needs_the_same_words() {
        let kv = MemKv::default();
        put(
            &kv,
            &chat(&[("user", "What is the capital of France?")]),
            scope(),
            "Paris",
            &Policy::default(),
        );
        let same_words = chat(&[("user", "what is the CAPITAL of france")]);
        assert_eq!(content(&semantic(&kv, &same_words, scope())), Some("Paris"));
        for other in [
            "What is the capital of Spain?",
            "What's the capital of France?",
            "France: what is the capital?",
        ] {
            assert_eq!(
                semantic(&kv, &chat(&[("user", other)]), scope()),
                None,
                "{other}"
            );
        }
    }

    /// A long system prompt (1500 distinct pseudo-words), so that it dominates a conversation.
    fn long_system_prompt() -> String {
        words(9, 1500).join(" ")
    }

    #[test]
    fn an_earlier_turn_that_differs_is_a_miss() {
        let kv = MemKv::default();
        let system = long_system_prompt() + " " + PARAGRAPH;
        // An earlier user turn of ~60 words: same first and last words and no numbers, but
        // its middle differs.
        let turn = |middle: &str| {
            format!("I would like some help planning a trip along the coast this spring, {middle} and I would like the plan to stay simple please.")
        };
        let a = turn("visiting small fishing villages, eating grilled sardines in the harbour, walking the cliff paths at dawn, and sleeping in quiet guesthouses run by local families who know the tides");
        let b = turn("renting a camper van, driving inland through vineyards and old mining towns, swimming in mountain lakes, and camping under the stars far away from any busy road or city lights");
        let conv = |earlier: &str| {
            chat(&[
                ("system", &system),
                ("user", earlier),
                ("assistant", "Happy to help."),
                ("user", "Go on."),
            ])
        };
        put(
            &kv,
            &conv(&a),
            scope(),
            "A plan for villages.",
            &Policy::default(),
        );
        let other = conv(&b);
        // The whole conversations look alike (the system prompt dominates) and share the frame,
        // so the bucket finds the entry: only the per-message check refuses it.
        let first = conv(&a);
        let stored = Key::of(&first, scope());
        let key = Key::of(&other, scope());
        let (sa, sb) = (stored.semantic(), key.semantic());
        assert_eq!(sa.frame_hex(), sb.frame_hex());
        let estimate = sa.signature().estimate(sb.signature());
        assert!(estimate >= DEFAULT_THRESHOLD, "{estimate}");
        let whole = sb
            .whole
            .similarity(&Stored::decode(&sa.whole.encode()).unwrap());
        assert!(whole >= DEFAULT_THRESHOLD, "{whole}");
        let turn_sim =
            sb.messages[1].similarity(&Stored::decode(&sa.messages[1].encode()).unwrap());
        assert!(turn_sim < 0.5, "{turn_sim}");
        assert_eq!(semantic(&kv, &other, scope()), None);
        // While the same conversation with a changed word in the (long) system prompt hits.
        let reworded = system.replace("careful handwriting", "neat handwriting");
        let near = chat(&[
            ("system", &reworded),
            ("user", &a),
            ("assistant", "Happy to help."),
            ("user", "Go on."),
        ]);
        assert_eq!(
            content(&semantic(&kv, &near, scope())),
            Some("A plan for villages.")
        );
        // Another role sequence never hits.
        let roles = chat(&[
            ("system", &system),
            ("user", &a),
            ("user", "Happy to help."),
            ("user", "Go on."),
        ]);
        assert_eq!(semantic(&kv, &roles, scope()), None);
    }

    #[test]
    fn numbers_and_instructions_must_match() {
        let kv = MemKv::default();
        let ask = |tail: &str| chat(&[("user", &format!("{PARAGRAPH} {tail}"))]);
        put(
            &kv,
            &ask("Then tell me what is 17*23."),
            scope(),
            "391",
            &Policy::default(),
        );
        assert_eq!(
            content(&semantic(
                &kv,
                &ask("then tell me, what is 17 * 23"),
                scope()
            )),
            Some("391")
        );
        for other in [
            "Then tell me what is 17*24.",
            "Then tell me what is 17+23.",
            "Then tell me what is 1723.",
            "Then tell me what is 17*23*2.",
        ] {
            assert_eq!(semantic(&kv, &ask(other), scope()), None, "{other}");
        }
        // The instruction at either end of a long prompt is anchored.
        put(
            &kv,
            &ask("Answer in French."),
            scope(),
            "fr",
            &Policy::default(),
        );
        assert_eq!(
            content(&semantic(&kv, &ask("Answer in French"), scope())),
            Some("fr")
        );
        assert_eq!(semantic(&kv, &ask("Answer in German."), scope()), None);
        let before = chat(&[("user", &format!("In German: {PARAGRAPH} Answer in French."))]);
        assert_eq!(semantic(&kv, &before, scope()), None);
    }

    #[test]
    fn non_text_content_must_match() {
        let kv = MemKv::default();
        let with_image = |url: &str| {
            req(
                json!({"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": PARAGRAPH},
                    {"type": "image_url", "image_url": {"url": url}}
                ]}]}),
            )
        };
        put(
            &kv,
            &with_image("https://x/a.png"),
            scope(),
            "a",
            &Policy::default(),
        );
        let reworded = PARAGRAPH.replace("sketches of gulls", "sketches of terns");
        let near = req(
            json!({"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "text", "text": reworded},
                {"type": "image_url", "image_url": {"url": "https://x/a.png"}}
            ]}]}),
        );
        assert_eq!(content(&semantic(&kv, &near, scope())), Some("a"));
        assert_eq!(semantic(&kv, &with_image("https://x/b.png"), scope()), None);
        // Parameters too.
        let mut hot = serde_json::to_value(near.body()).unwrap();
        hot["max_tokens"] = json!(5);
        assert_eq!(semantic(&kv, &req(hot), scope()), None);
    }

    /// The prompts of the end-to-end cache tests (tests/integration/test_edge_state.py).
    const E2E_LONG: &str = "Our team maintains a small library that parses configuration files \
        written by hand. Users report that when a section header is followed by an empty line and \
        then a comment, the parser attaches the comment to the wrong section, and the values \
        after it are silently dropped. We reproduced this on the latest release with the default \
        options. The file in question has eight sections, each with three or four keys, and the \
        problem only appears in the fifth one, right after a block of commented out settings that \
        someone left behind during a migration. Could you explain what the most likely cause is, \
        how we should write a regression test that captures the behaviour without depending on \
        the exact file, and what a careful fix would look like so that existing users who rely \
        on the current handling of blank lines are not surprised after they upgrade to the next \
        version of the library in a few weeks from now";
    const E2E_FIRST_TURN: &str = "I have a question about a configuration parser that my \
        colleagues and I have been maintaining for a couple of years now, written in a plain \
        subset of Python";

    #[test]
    fn the_end_to_end_cases() {
        let kv = MemKv::default();
        put(
            &kv,
            &chat(&[("user", E2E_LONG)]),
            scope(),
            "long",
            &Policy::default(),
        );
        let one_word = E2E_LONG.replace("silently dropped", "quietly dropped");
        assert_eq!(
            content(&semantic(&kv, &chat(&[("user", &one_word)]), scope())),
            Some("long")
        );
        let number = |n: &str| chat(&[("user", &format!("{E2E_LONG} Also, what is {n}?"))]);
        put(&kv, &number("17*23"), scope(), "391", &Policy::default());
        assert_eq!(semantic(&kv, &number("17*24"), scope()), None);
        assert_eq!(
            content(&semantic(&kv, &number("17*23"), scope())),
            Some("391")
        );
        let conv = |first: &str| {
            chat(&[
                ("user", first),
                ("assistant", "Sure, tell me more about the parser."),
                ("user", E2E_LONG),
            ])
        };
        put(
            &kv,
            &conv(E2E_FIRST_TURN),
            scope(),
            "conv",
            &Policy::default(),
        );
        let few = E2E_FIRST_TURN.replace("couple of years", "few years");
        assert_eq!(semantic(&kv, &conv(&few), scope()), None);
        assert_eq!(
            semantic(
                &kv,
                &conv("Something else entirely: the weather in Oslo"),
                scope()
            ),
            None
        );
        assert_eq!(
            content(&semantic(&kv, &conv(E2E_FIRST_TURN), scope())),
            Some("conv")
        );
    }

    #[test]
    fn expired_entries_are_ignored() {
        let kv = MemKv::default();
        let r = chat(&[("user", PARAGRAPH)]);
        let policy = Policy {
            ttl_ms: 60_000,
            ..Policy::default()
        };
        put(&kv, &r, scope(), "x", &policy);
        assert!(exact(&kv, &r, scope(), NOW + 59_999).is_some());
        assert_eq!(exact(&kv, &r, scope(), NOW + 60_000), None);
        let key = Key::of(&r, scope());
        assert!(lookup_semantic(&kv, &key, &policy, NOW + 59_999)
            .unwrap()
            .is_some());
        assert_eq!(
            lookup_semantic(&kv, &key, &policy, NOW + 60_000).unwrap(),
            None
        );
    }

    #[test]
    fn the_ring_overwrites_the_oldest_and_never_misreads() {
        let kv = MemKv::default();
        let policy = Policy {
            max_entries: 4,
            ..Policy::default()
        };
        let reqs: Vec<ChatRequest> = (0..6)
            .map(|i| chat(&[("user", &format!("{PARAGRAPH} Story number {i}."))]))
            .collect();
        for (i, r) in reqs.iter().enumerate() {
            let receipt = store(
                &kv,
                &Key::of(r, scope()),
                &answer(&format!("answer {i}")),
                &policy,
                NOW,
            )
            .unwrap()
            .unwrap();
            assert_eq!(receipt.slot, i as u64 % 4);
        }
        for (i, r) in reqs.iter().enumerate() {
            let key = Key::of(r, scope());
            let e = lookup_exact(&kv, &key, NOW).unwrap();
            let s = lookup_semantic(&kv, &key, &policy, NOW).unwrap();
            if i < 2 {
                assert_eq!((e, s), (None, None), "{i}");
            } else {
                let want = format!("answer {i}");
                assert_eq!(content(&e), Some(want.as_str()));
                assert_eq!(content(&s), Some(want.as_str()));
            }
        }
        // Keys stay bounded: 4 slots, their index keys, 8 buckets each, the counter.
        let n = kv.get_many(&[NEXT_KEY.to_owned()]).unwrap();
        assert_eq!(crate::kv::decode_counter(n[0].as_ref().unwrap()), Some(6));
        for slot in 4..6 {
            assert!(!kv.exists(&entry_key(slot)).unwrap());
        }
    }

    #[test]
    fn an_index_collision_is_a_miss_not_a_wrong_answer() {
        let kv = MemKv::default();
        // Find two requests whose hashes share their first 4 hex digits (≈ 300 tries).
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let reqs: Vec<ChatRequest> = (0..5000)
            .map(|i| chat(&[("user", &format!("q{i}"))]))
            .collect();
        let (a, b) = (0..reqs.len())
            .find_map(|i| {
                let k = index_key(&Key::of(&reqs[i], scope()));
                seen.insert(k, i).map(|j| (j, i))
            })
            .expect("a collision among 5000");
        let exact_only = Policy {
            mode: Mode::Exact,
            ..Policy::default()
        };
        put(&kv, &reqs[a], scope(), "A", &exact_only);
        put(&kv, &reqs[b], scope(), "B", &exact_only);
        assert_eq!(exact(&kv, &reqs[a], scope(), NOW), None);
        assert_eq!(content(&exact(&kv, &reqs[b], scope(), NOW)), Some("B"));
        // Even if the index is forged to point at B's slot, A's hash is checked in the entry.
        let key_a = Key::of(&reqs[a], scope());
        let forged = format!("1:2:{}", key_a.hash_hex());
        assert_eq!(
            exact_from(Some(forged.as_bytes()), &kv, &key_a, NOW).unwrap(),
            None
        );
        // Exact mode writes no bucket.
        let keys = kv
            .get_many(&Key::of(&reqs[b], scope()).semantic().bucket_keys())
            .unwrap();
        assert!(keys.iter().all(Option::is_none));
    }

    /// A store that counts reads, to check the lookups' round trips.
    #[derive(Default)]
    struct Counts {
        gets: Cell<usize>,
        get_manys: Cell<usize>,
    }

    impl testing::Hook for Counts {
        fn before(&self, op: &'static str, _key: &str, _inner: &MemKv) -> KvResult<()> {
            let c = match op {
                "get" => &self.gets,
                "get_many" => &self.get_manys,
                _ => return Ok(()),
            };
            c.set(c.get() + 1);
            Ok(())
        }
    }

    #[test]
    fn round_trips_per_lookup() {
        let kv = testing::Hooked::<Counts>::default();
        let r = chat(&[("user", PARAGRAPH)]);
        store(
            &kv,
            &Key::of(&r, scope()),
            &answer("x"),
            &Policy::default(),
            NOW,
        )
        .unwrap();
        let key = Key::of(&r, scope());
        assert!(lookup_semantic(&kv, &key, &Policy::default(), NOW)
            .unwrap()
            .is_some());
        assert_eq!((kv.hook.gets.get(), kv.hook.get_manys.get()), (0, 2));
        assert!(lookup_exact(&kv, &key, NOW).unwrap().is_some());
        assert_eq!((kv.hook.gets.get(), kv.hook.get_manys.get()), (2, 2));
        // A miss with empty buckets: one get_many only.
        let other = chat(&[("user", "Something else entirely.")]);
        let miss = Key::of(&other, scope());
        assert_eq!(
            lookup_semantic(&kv, &miss, &Policy::default(), NOW).unwrap(),
            None
        );
        assert_eq!(kv.hook.get_manys.get(), 3);
    }

    fn big_answer(bytes: usize) -> String {
        // Varied, multi-byte text so that chunk boundaries fall inside characters too.
        let mut s = String::with_capacity(bytes + 64);
        let mut i = 0u64;
        while s.len() < bytes {
            s.push_str(&format!("mot{i} é€ "));
            i += 1;
        }
        s
    }

    #[test]
    fn a_large_answer_is_chunked_and_read_back() {
        let kv = MemKv::default();
        let r = chat(&[("user", PARAGRAPH)]);
        let text = big_answer(700 * 1024);
        let key = Key::of(&r, scope());
        let receipt = store(&kv, &key, &answer(&text), &Policy::default(), NOW)
            .unwrap()
            .unwrap();
        assert_eq!(receipt.parts, 3);
        for i in 0..receipt.parts {
            let k = if i == 0 {
                entry_key(0)
            } else {
                chunk_key(0, i)
            };
            let v = kv.get(&k).unwrap().unwrap();
            assert!(v.len() <= CHUNK_BYTES, "{k}: {}", v.len());
        }
        assert_eq!(
            content(&lookup_exact(&kv, &key, NOW).unwrap()),
            Some(text.as_str())
        );
        let s = lookup_semantic(&kv, &key, &Policy::default(), NOW).unwrap();
        assert_eq!(content(&s), Some(text.as_str()));
    }

    #[test]
    fn an_entry_over_the_limit_is_refused_without_writing() {
        let kv = MemKv::default();
        let r = chat(&[("user", PARAGRAPH)]);
        let key = Key::of(&r, scope());
        let err = store(
            &kv,
            &key,
            &answer(&big_answer(MAX_ENTRY_BYTES)),
            &Policy::default(),
            NOW,
        )
        .unwrap_err();
        assert!(
            matches!(err, CacheError::TooLarge { bytes, max } if bytes > max && max == MAX_ENTRY_BYTES)
        );
        assert!(err.to_string().contains("larger than"));
        assert!(!kv.exists(NEXT_KEY).unwrap());
        assert!(!kv.exists(&index_key(&key)).unwrap());
        assert!(!kv.exists(&entry_key(0)).unwrap());
        // Just under the limit fits, in at most 1 + MAX_CHUNKS keys.
        let fits = answer(&big_answer(MAX_ENTRY_BYTES - 8 * 1024));
        let receipt = store(&kv, &key, &fits, &Policy::default(), NOW)
            .unwrap()
            .unwrap();
        assert!(
            receipt.parts <= 1 + MAX_CHUNKS && receipt.parts >= MAX_CHUNKS,
            "{receipt:?}"
        );
        assert!(lookup_exact(&kv, &key, NOW).unwrap().is_some());
    }

    #[test]
    fn a_missing_or_foreign_chunk_is_a_miss() {
        let kv = MemKv::default();
        let r = chat(&[("user", PARAGRAPH)]);
        let key = Key::of(&r, scope());
        store(
            &kv,
            &key,
            &answer(&big_answer(700 * 1024)),
            &Policy::default(),
            NOW,
        )
        .unwrap();
        let hit = || {
            lookup_exact(&kv, &key, NOW).unwrap().is_some()
                && lookup_semantic(&kv, &key, &Policy::default(), NOW)
                    .unwrap()
                    .is_some()
        };
        let miss = || {
            lookup_exact(&kv, &key, NOW).unwrap().is_none()
                && lookup_semantic(&kv, &key, &Policy::default(), NOW)
                    .unwrap()
                    .is_none()
        };
        assert!(hit());
        let chunk = chunk_key(0, 2);
        let good = kv.get(&chunk).unwrap().unwrap();
        // Missing.
        kv.delete(&chunk).unwrap();
        assert!(miss());
        // A changed letter (still valid JSON: only the digest tells).
        let mut bad = good.clone();
        let at = good.len() / 2
            + good[good.len() / 2..]
                .iter()
                .position(|&b| b == b'm')
                .unwrap();
        bad[at] = b'n';
        kv.set(&chunk, &bad).unwrap();
        assert!(miss());
        // From another write (another generation).
        let mut foreign = good.clone();
        foreign[..8].copy_from_slice(&99u64.to_le_bytes());
        kv.set(&chunk, &foreign).unwrap();
        assert!(miss());
        // Truncated.
        kv.set(&chunk, &good[..good.len() / 2]).unwrap();
        assert!(miss());
        kv.set(&chunk, &good).unwrap();
        assert!(hit());
        // A garbled head.
        let head = kv.get(&entry_key(0)).unwrap().unwrap();
        kv.set(&entry_key(0), b"FRc1 garbage").unwrap();
        assert!(miss());
        let mut many = head.clone();
        many[12..14].copy_from_slice(&u16::MAX.to_le_bytes());
        kv.set(&entry_key(0), &many).unwrap();
        assert!(miss());
        kv.set(&entry_key(0), &head).unwrap();
        assert!(hit());
    }

    fn entry_with(message: Value) -> Entry {
        let r = chat(&[("user", "hi")]);
        let kv = MemKv::default();
        let key = Key::of(&r, scope());
        let mut a = answer("");
        a.message = message.as_object().unwrap().clone();
        a.finish_reason = "stop".into();
        store(&kv, &key, &a, &Policy::default(), NOW).unwrap();
        lookup_exact(&kv, &key, NOW).unwrap().unwrap().entry
    }

    #[test]
    fn render_json_is_a_chat_completion() {
        let e = entry_with(
            json!({"role": "assistant", "content": "Hello.", "reasoning_content": "Think."}),
        );
        let v: Value = serde_json::from_slice(&render_json(&e, "chatcmpl-1", 42)).unwrap();
        assert_eq!(v["id"], "chatcmpl-1");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["created"], 42);
        assert_eq!(v["model"], "llama-3.1-8b-instant");
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["choices"][0]["message"],
            json!({"role": "assistant", "content": "Hello.", "reasoning_content": "Think."})
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46, "cost": 0})
        );
        assert_eq!(
            Usage::from_object(&v),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 34
            })
        );
        // A tool-call answer keeps `content: null`.
        let t = entry_with(
            json!({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
        );
        let v: Value = serde_json::from_slice(&render_json(&t, "c", 1)).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["id"], "c1");
    }

    /// The `data:` payloads of an SSE body, in order.
    fn events(body: &[u8]) -> Vec<String> {
        let s = std::str::from_utf8(body).unwrap();
        assert!(s.ends_with("\n\n"));
        s.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect(e).to_owned())
            .collect()
    }

    #[test]
    fn render_sse_is_a_chat_completion_stream() {
        let text = big_answer(10_000);
        let e =
            entry_with(json!({"role": "assistant", "content": text, "reasoning_content": "Hmm."}));
        for include_usage in [false, true] {
            let ev = events(&render_sse(&e, "chatcmpl-9", 7, include_usage));
            assert_eq!(ev.last().unwrap(), "[DONE]");
            let chunks: Vec<Value> = ev[..ev.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            for c in &chunks {
                assert_eq!(c["id"], "chatcmpl-9");
                assert_eq!(c["object"], "chat.completion.chunk");
                assert_eq!(c["created"], 7);
                assert_eq!(c["model"], "llama-3.1-8b-instant");
                assert_eq!(c.get("usage").is_some(), include_usage);
            }
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let deltas = |field: &str| -> String {
                chunks
                    .iter()
                    .filter_map(|c| c["choices"][0]["delta"][field].as_str())
                    .collect()
            };
            assert_eq!(deltas("content"), text);
            assert_eq!(deltas("reasoning_content"), "Hmm.");
            let content_chunks = chunks
                .iter()
                .filter(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|s| !s.is_empty())
                })
                .count();
            assert_eq!(content_chunks, text.len().div_ceil(SSE_PIECE_BYTES).max(3));
            let finishes: Vec<&Value> = chunks
                .iter()
                .filter(|c| {
                    !c["choices"][0]["finish_reason"].is_null()
                        && c["choices"].as_array().is_some_and(|a| !a.is_empty())
                })
                .collect();
            assert_eq!(finishes.len(), 1);
            assert_eq!(finishes[0]["choices"][0]["finish_reason"], "stop");
            let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
            if include_usage {
                assert_eq!(usage.len(), 1);
                assert!(std::ptr::eq(usage[0], chunks.last().unwrap()));
                assert_eq!(usage[0]["choices"], json!([]));
                assert_eq!(usage[0]["usage"]["total_tokens"], 46);
            } else {
                assert!(usage.is_empty());
                assert!(std::ptr::eq(finishes[0], chunks.last().unwrap()));
            }
        }
        // Tool calls stream with their index.
        let t = entry_with(
            json!({"content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
        );
        let ev = events(&render_sse(&t, "c", 1, false));
        let calls: Vec<Value> = ev[..ev.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| c["choices"][0]["delta"].get("tool_calls").cloned())
            .collect();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0][0]["index"], 0);
        assert_eq!(calls[0][0]["function"]["name"], "f");
    }

    #[test]
    fn answers_from_completions() {
        let body = br#"{"id":"x","object":"chat.completion","created":5,"model":"m1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi","refusal":null},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let a = Answer::from_completion(body, "groq").unwrap();
        assert_eq!(
            (
                a.provider.as_str(),
                a.model.as_str(),
                a.finish_reason.as_str()
            ),
            ("groq", "m1", "length")
        );
        assert_eq!((a.prompt_tokens, a.completion_tokens, a.created), (3, 4, 5));
        assert_eq!(a.message["content"], "Hi");
        assert_eq!(Answer::from_completion(br#"{"choices":[]}"#, "g"), None);
        assert_eq!(Answer::from_completion(b"nope", "g"), None);
    }

    #[test]
    fn what_is_cacheable_by_default() {
        let ok = |v: Value| cacheable(&req(v));
        let m = json!([{"role": "user", "content": "x"}]);
        assert!(ok(json!({"model": "a", "messages": m, "temperature": 0})));
        assert!(ok(
            json!({"model": "a", "messages": m, "temperature": 0.7, "seed": 1})
        ));
        assert!(ok(
            json!({"model": "a", "messages": m, "temperature": 0, "n": 1, "tools": []})
        ));
        assert!(!ok(json!({"model": "a", "messages": m})));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0.2})
        ));
        assert!(!ok(json!({"model": "a", "messages": m, "seed": "1"})));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0, "n": 2})
        ));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0, "tools": [{"type": "function", "function": {"name": "f"}}]})
        ));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0, "functions": [{"name": "f"}]})
        ));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0, "logprobs": true})
        ));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0, "modalities": ["text", "audio"]})
        ));
        assert!(!ok(
            json!({"model": "a", "messages": m, "temperature": 0, "web_search_options": {}})
        ));
        let off = Policy {
            mode: Mode::Off,
            ..Policy::default()
        };
        let r = req(json!({"model": "a", "messages": m, "temperature": 0}));
        assert!(Policy::default().applies(&r) && !off.applies(&r));
        // Off stores nothing.
        let kv = MemKv::default();
        assert_eq!(
            store(&kv, &Key::of(&r, scope()), &answer("x"), &off, NOW).unwrap(),
            None
        );
        assert!(!kv.exists(NEXT_KEY).unwrap());
    }

    #[test]
    fn counters_are_stats_increments() {
        let fields: Vec<&str> = Counter::ALL.iter().map(|c| c.field()).collect();
        assert_eq!(
            fields,
            [
                "hits_exact",
                "hits_semantic",
                "misses",
                "stores",
                "too_large"
            ]
        );
        assert_eq!(
            Counter::Misses.op(),
            KvOp::Increment {
                key: "stats:v1:cache:misses".into(),
                delta: 1
            }
        );
    }

    #[test]
    fn kv_schema_documents_every_cache_key() {
        let doc = include_str!("../kv-schema/README.md");
        for k in [
            "`cache:v1:next`",
            "`cache:v1:entry:<slot>`",
            "`cache:v1:entry:<slot>:<i>`",
            "`cache:v1:x:<hash4>`",
            "`cache:v1:lsh:<band>:<bucket>`",
            "`stats:v1:cache:<field>`",
        ] {
            assert!(doc.contains(k), "{k} is not in kv-schema/README.md");
        }
        // The builders make those shapes.
        let r = chat(&[("user", "x")]);
        let key = Key::of(&r, scope());
        assert_eq!(
            index_key(&key),
            format!("cache:v1:x:{}", &key.hash_hex()[..4])
        );
        assert_eq!(entry_key(3), "cache:v1:entry:3");
        assert_eq!(chunk_key(3, 1), "cache:v1:entry:3:1");
        assert_eq!(bucket_key(7, 0xab), "cache:v1:lsh:7:00ab");
        assert!(key
            .semantic()
            .bucket_keys()
            .iter()
            .all(|k| k.len() == "cache:v1:lsh:0:0000".len()));
    }

    #[test]
    fn tokens_numbers_and_anchors() {
        let words = |s: &str| scan(s).anchors;
        // Case and punctuation do not matter; words do.
        assert_eq!(words("Hello, WORLD!"), words("hello world"));
        assert_ne!(words("hello world"), words("hello-worlds"));
        assert_eq!(words("Ünïcode CAFÉ"), words("ünïcode café"));
        // CJK characters are words of their own.
        assert_eq!(scan("東京は晴れ").anchors.len(), 2 * 5);
        let nums = |s: &str| String::from_utf8(scan(s).numbers).unwrap();
        assert_eq!(nums("what is 17 * 23?"), "17*23|");
        assert_eq!(nums("what is 17*23."), "17*23|");
        assert_eq!(nums("pi is 3.14, roughly"), "3.14|");
        assert_eq!(nums("17 23 and 1723"), "17 23|1723|");
        assert_eq!(nums("x2 and -5 and well-known"), "2|-5|");
        assert_eq!(nums("no numbers here."), "");
        // Anchors: the first and last 8 words.
        let long: String = (0..30).map(|i| format!("w{i} ")).collect();
        assert_eq!(scan(&long).anchors.len(), 16);
        assert_eq!(scan("a b c").anchors.len(), 6);
        // A text of one or two words still has a sketch.
        assert!(!signature("hi").is_empty());
        assert!(signature(" ... ").is_empty());
        assert_eq!(similarity("Hi!", "hi"), 1.0);
        assert_eq!(similarity("", "..."), 1.0);
        assert_eq!(similarity("hi", ""), 0.0);
    }

    /// A text of `n` distinct pseudo-words.
    fn words(seed: u64, n: usize) -> Vec<String> {
        (0..n as u64)
            .map(|i| format!("w{:x}", scramble(seed * 1_000_003 + i) >> 40))
            .collect()
    }

    #[test]
    fn the_estimate_tracks_the_true_jaccard() {
        // Two texts sharing a run of words: shingle sets of known overlap.
        for (shared, own) in [(900usize, 100usize), (800, 200), (500, 500), (950, 50)] {
            let common = words(1, shared);
            let a: Vec<String> = common.iter().cloned().chain(words(2, own)).collect();
            let b: Vec<String> = common.iter().cloned().chain(words(3, own)).collect();
            // 3-shingles: shared − 2 in common; each text has `own` more of its own (the two
            // crossing into its own words, and own − 2 within them).
            let inter = (shared - 2) as f64;
            let truth = inter / (inter + 2.0 * own as f64);
            let est = similarity(&a.join(" "), &b.join(" "));
            assert!(
                (est - truth).abs() < 0.06,
                "{shared}/{own}: {est} vs {truth}"
            );
        }
        // Small sets are exact.
        let base = words(4, 40);
        let mut other = base.clone();
        other[20] = "changed".into();
        let (ra, rb) = (
            chat(&[("user", &base.join(" "))]),
            chat(&[("user", &other.join(" "))]),
        );
        let (ka, kb) = (Key::of(&ra, scope()), Key::of(&rb, scope()));
        let s = kb.semantic().messages[0]
            .similarity(&Stored::decode(&ka.semantic().messages[0].encode()).unwrap());
        assert_eq!(s, 35.0 / 41.0);
    }

    #[test]
    fn stored_sketches_round_trip() {
        let big: String = words(5, 2000).join(" ");
        let r = chat(&[("user", &big), ("user", "short one")]);
        let key = Key::of(&r, scope());
        let sem = key.semantic();
        assert!(sem.messages[0].set.is_none() && sem.messages[1].set.is_some());
        for m in &sem.messages {
            let enc = m.encode();
            assert_eq!(m.similarity(&Stored::decode(&enc).unwrap()), 1.0);
        }
        assert!(Stored::decode("x12").is_none());
        assert!(Stored::decode("m12").is_none());
        assert!(Stored::decode("s0123").is_none());
        assert!(Stored::decode("").is_none());
        // A large text against a stored small set: estimated from the set.
        let small = sketch_text("one two three four").0;
        assert_eq!(
            sem.messages[0].similarity(&Stored::decode(&small.encode()).unwrap()),
            0.0
        );
    }
}
