//! The context optimizer and per-provider prompt shaping.
//!
//! [`fit`] makes a conversation fit a candidate's context window: it keeps every system and
//! developer message, the last user message and whatever follows it last (pending tool results,
//! a prefill), then the latest turns, then the older messages worth the most (scored: recency,
//! rare words shared with the last user message, code or pasted documents the last message is
//! about, the first user message), and says where it left messages out. [`shape`] adapts a
//! request to what a model takes: JSON mode as an instruction, system prompts folded into the
//! first user message.
//!
//! Sizes are the quota's estimate ([`crate::quota::estimate_prompt_tokens`]): bytes / 4 of the
//! body as it would be serialised, computed from string lengths without serialising anything.
//!
//! Order of use: `fit` first, then `shape` (which folds `fit`'s note along with the system
//! prompt). `shape` adds at most [`MAX_SCHEMA_BYTES`] and a sentence: callers that must not go
//! over the window reserve that much when fitting.

use crate::catalog::Caps;
use crate::wire::openai::ChatRequest;
use serde_json::{json, Map, Value};

/// Estimated prompt tokens of a request: bytes / 4 (rounded up) of its body as compact JSON —
/// messages, tools, response format and parameters, so it matches
/// [`crate::quota::estimate_prompt_tokens`] of the serialised body. Computed by walking the
/// body: string lengths plus their escapes (`"`, `\` and control characters, each counted as
/// one extra byte) and JSON punctuation; integers exactly, other numbers as 8 bytes.
pub fn tokens(request: &ChatRequest) -> u32 {
    let body = request.body();
    let messages = messages(body);
    let bytes = fixed_bytes(body) + messages.iter().map(message_bytes).sum::<usize>();
    to_tokens(bytes)
}

/// Whether a request fits a window, and what was left out to make it fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    /// As it is, with room for the answer.
    Fits,
    /// Fits once some older messages are left out.
    Trimmed(Trimmed),
    /// Even the messages that must stay (system and developer messages, the last user message
    /// and what follows it) leave no room: `needed` is the smallest window that would do,
    /// answer reserve included.
    TooLarge { needed: u32, window: u32 },
}

/// A request cut down to fit, and what was cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Trimmed {
    pub request: ChatRequest,
    pub before_tokens: u32,
    pub after_tokens: u32,
    /// Indices, in the original `messages`, of the messages left out (ascending).
    pub dropped: Vec<usize>,
    /// Why, for the audit log: the budget, what was kept and what was dropped.
    pub reasons: Vec<String>,
}

impl Trimmed {
    /// Everything but the request, for the audit log.
    pub fn summary(&self) -> Value {
        json!({
            "before_tokens": self.before_tokens,
            "after_tokens": self.after_tokens,
            "dropped": self.dropped,
            "reasons": self.reasons,
        })
    }
}

/// The newest droppable units (a message, or a tool call with its results) kept before any
/// scored one: the turn the last user message answers.
const LATEST_UNITS: usize = 2;
/// Scores, in points. Kept first: the latest turns (`LATEST_BONUS` times `LATEST_UNITS` less
/// their rank from the newest).
const LATEST_BONUS: u64 = 1_000_000;
/// Recency of the `r`-th newest droppable unit: `RECENCY * 4 / (4 + r)` (1000, 800, 667, …).
const RECENCY: u64 = 1_000;
/// Rare words shared with the last user message, at most.
const RELEVANCE: u64 = 2_000;
/// A unit with a fenced code block when the last user message is about code.
const CODE_BONUS: u64 = 600;
/// A pasted document (a user message of at least [`DOCUMENT_BYTES`]) when the last user
/// message refers to one.
const DOCUMENT_BONUS: u64 = 600;
const DOCUMENT_BYTES: usize = 2_048;
/// The first user message: it often states the task.
const FIRST_USER_BONUS: u64 = 750;
/// Distinct words of the last user message that relevance considers (its first ones).
const MAX_QUERY_WORDS: usize = 256;
/// Text of one unit scanned for those words (its first bytes).
const MAX_SCAN_BYTES: usize = 64 * 1024;

/// What [`fit`] inserts where it left messages out.
pub fn omission_note(dropped: usize) -> Value {
    let what = if dropped == 1 { "message" } else { "messages" };
    json!({
        "role": "system",
        "content": format!(
            "[FreeRelay: {dropped} earlier {what} omitted to fit the model's context window]"
        ),
    })
}

/// Makes `request` fit `window` tokens with `reserve_output` of them left for the answer (the
/// `max_tokens` asked, or the caller's default).
///
/// Kept whatever it costs: every system and developer message, the last user message and the
/// last unit of the conversation (a tool call with its results, a prefill). Then, while they
/// fit, in order of score (ties: the newer first): the [`LATEST_UNITS`] newest units, then the
/// others, scored by recency, rare words shared with the last user message (inverse document
/// frequency over the droppable units), a fenced code block when the last message is about
/// code, a pasted document when it refers to one, and the first user message. A unit that does
/// not fit what is left is passed over for smaller ones. An assistant message calling tools and
/// the `tool` messages answering it are one unit, kept or dropped together. A system note
/// ([`omission_note`]) after the leading system messages says how many messages were left out;
/// it is counted. Deterministic; linear in the body's size apart from sorting the units.
pub fn fit(request: &ChatRequest, window: u32, reserve_output: u32) -> Fit {
    let body = request.body();
    let msgs = messages(body);
    let fixed = fixed_bytes(body);
    let sizes: Vec<usize> = msgs.iter().map(message_bytes).collect();
    let total = fixed + sizes.iter().sum::<usize>();
    let before = to_tokens(total);
    let budget = window.saturating_sub(reserve_output);
    if before <= budget && reserve_output <= window {
        return Fit::Fits;
    }

    let mut units = units(msgs, &sizes);
    let last_user = msgs.iter().rposition(|m| role(m) == "user");
    let last_unit = units.len().checked_sub(1);
    for (i, u) in units.iter_mut().enumerate() {
        u.pinned = Some(i) == last_unit
            || matches!(role(&msgs[u.start]), "system" | "developer")
            || last_user.is_some_and(|l| (u.start..u.end).contains(&l));
    }
    let droppable: Vec<usize> = (0..units.len()).filter(|&i| !units[i].pinned).collect();
    let droppable_messages: usize = droppable.iter().map(|&i| units[i].len()).sum();
    let pinned_bytes: usize = units.iter().filter(|u| u.pinned).map(|u| u.bytes).sum();
    let note_max = if droppable.is_empty() {
        0
    } else {
        message_bytes(&omission_note(droppable_messages))
    };
    let minimum = fixed + pinned_bytes + note_max;
    let limit = (budget as usize).saturating_mul(4);
    if minimum > limit || reserve_output > window {
        return Fit::TooLarge {
            needed: to_tokens(minimum).saturating_add(reserve_output),
            window,
        };
    }

    // Score the droppable units, then keep the best while they fit.
    let scores = score(msgs, &units, &droppable, last_user);
    let mut order = droppable.clone();
    order.sort_unstable_by(|&a, &b| {
        scores[b]
            .cmp(&scores[a])
            .then(units[b].start.cmp(&units[a].start))
    });
    let mut left = limit - minimum;
    let mut keep: Vec<bool> = units.iter().map(|u| u.pinned).collect();
    let (mut latest_kept, mut scored_kept, mut passed_over) = (0, 0, 0);
    let first_user = msgs.iter().position(|m| role(m) == "user");
    let mut first_user_kept = false;
    for &u in &order {
        if units[u].bytes <= left {
            left -= units[u].bytes;
            keep[u] = true;
            if scores[u] >= LATEST_BONUS {
                latest_kept += units[u].len();
            } else {
                scored_kept += units[u].len();
                first_user_kept |= first_user == Some(units[u].start);
            }
        } else {
            passed_over += units[u].len();
        }
    }

    let mut dropped = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        if !keep[u] {
            dropped.extend(unit.start..unit.end);
        }
    }
    let note = omission_note(dropped.len());
    let lead = msgs
        .iter()
        .take_while(|m| matches!(role(m), "system" | "developer"))
        .count();
    let kept_bytes: usize = (0..units.len())
        .filter(|&u| keep[u])
        .map(|u| units[u].bytes)
        .sum();
    let after = to_tokens(fixed + kept_bytes + message_bytes(&note));
    let trimmed = request.with_body(|_| {
        let mut out = Vec::with_capacity(msgs.len() - dropped.len() + 1);
        out.extend_from_slice(&msgs[..lead]);
        out.push(note);
        for (u, unit) in units.iter().enumerate() {
            if keep[u] && unit.start >= lead {
                out.extend_from_slice(&msgs[unit.start..unit.end]);
            }
        }
        out
    });

    let pinned_messages = msgs.len() - droppable_messages;
    let mut reasons = vec![
        format!(
            "the prompt (~{before} tokens) is over the {budget}-token budget: a {window}-token \
             window with {reserve_output} kept for the answer"
        ),
        format!(
            "kept {} of {} messages: {pinned_messages} required (system and developer messages, \
             the last user message, the last unit), {latest_kept} of the latest turns, \
             {scored_kept} chosen by score",
            msgs.len() - dropped.len(),
            msgs.len(),
        ),
        format!(
            "dropped {} messages, the lowest-scoring first ({passed_over} of them too large for \
             the room left); a note says so",
            dropped.len()
        ),
    ];
    if first_user_kept {
        reasons.push("kept the first user message (it often states the task)".into());
    }
    Fit::Trimmed(Trimmed {
        request: trimmed,
        before_tokens: before,
        after_tokens: after,
        dropped,
        reasons,
    })
}

/// Messages kept or dropped together: one message, or an assistant message calling tools
/// (or a legacy function) with the `tool` (`function`) messages that follow it.
struct Unit {
    start: usize,
    end: usize,
    bytes: usize,
    pinned: bool,
}

impl Unit {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

fn units(msgs: &[Value], sizes: &[usize]) -> Vec<Unit> {
    let mut units = Vec::with_capacity(msgs.len());
    let mut i = 0;
    while i < msgs.len() {
        let m = &msgs[i];
        let calls = role(m) == "assistant"
            && (m.get("tool_calls").is_some_and(|c| !c.is_null())
                || m.get("function_call").is_some_and(|c| !c.is_null()));
        let mut end = i + 1;
        if calls {
            while end < msgs.len() && matches!(role(&msgs[end]), "tool" | "function") {
                end += 1;
            }
        }
        units.push(Unit {
            start: i,
            end,
            bytes: sizes[i..end].iter().sum(),
            pinned: false,
        });
        i = end;
    }
    units
}

/// The score of each unit (meaningful for the droppable ones, 0 for the others).
fn score(
    msgs: &[Value],
    units: &[Unit],
    droppable: &[usize],
    last_user: Option<usize>,
) -> Vec<u64> {
    let mut scores = vec![0u64; units.len()];
    let query = last_user.map(|l| Query::of(&msgs[l])).unwrap_or_default();
    let first_user = msgs.iter().position(|m| role(m) == "user");

    // Which query words each droppable unit contains, and in how many units each occurs.
    let blocks = query.words.len().div_ceil(64);
    let mut found = vec![0u64; blocks * droppable.len()];
    let mut df = vec![0u32; query.words.len()];
    let mut code = vec![false; droppable.len()];
    for (k, &u) in droppable.iter().enumerate() {
        let bits = &mut found[k * blocks..(k + 1) * blocks];
        let mut scanned = 0;
        for m in &msgs[units[u].start..units[u].end] {
            for_each_text(m, &mut |text| {
                if (blocks == 0 && !query.code) || scanned >= MAX_SCAN_BYTES {
                    return;
                }
                let text = &text.as_bytes()[..text.len().min(MAX_SCAN_BYTES - scanned)];
                scanned += text.len();
                code[k] |= for_each_word(text, &mut |h, _| {
                    if let Some(q) = query.get(h) {
                        bits[q / 64] |= 1 << (q % 64);
                    }
                });
            });
        }
        for q in 0..query.words.len() {
            df[q] += (bits[q / 64] >> (q % 64)) as u32 & 1;
        }
    }
    // Rarer words weigh more: 1 / document frequency, over the words some unit shares.
    let weight: Vec<u64> = df
        .iter()
        .map(|&d| if d == 0 { 0 } else { 1_000_000 / u64::from(d) })
        .collect();
    let total: u64 = weight.iter().sum();

    for (k, &u) in droppable.iter().enumerate() {
        let rank = (droppable.len() - 1 - k) as u64;
        let mut s = RECENCY * 4 / (4 + rank);
        // The latest turns first, newest first, whatever else the older ones have.
        s += LATEST_BONUS * (LATEST_UNITS as u64).saturating_sub(rank);
        let bits = &found[k * blocks..(k + 1) * blocks];
        let shared: u64 = (0..query.words.len())
            .filter(|q| bits[q / 64] >> (q % 64) & 1 == 1)
            .map(|q| weight[q])
            .sum();
        // The square root of the shared fraction: a few rare words already count.
        if let Some(fraction) = (shared * 1_000_000).checked_div(total) {
            s += RELEVANCE * fraction.isqrt() / 1_000;
        }
        if query.code && code[k] {
            s += CODE_BONUS;
        }
        let start = &msgs[units[u].start];
        if query.document && role(start) == "user" && text_len(start) >= DOCUMENT_BYTES {
            s += DOCUMENT_BONUS;
        }
        if first_user == Some(units[u].start) {
            s += FIRST_USER_BONUS;
        }
        scores[u] = s;
    }
    scores
}

/// The words of the last user message relevance looks for, in a small open-addressing table.
#[derive(Default)]
struct Query {
    words: Vec<u64>,
    slots: Vec<u16>,
    /// The message is about code: a fenced block, or words like "function", "bug", "compile".
    code: bool,
    /// It refers to a pasted document: "the document", "the article", "above", "summarize"…
    document: bool,
}

/// Words too common to say what a message is about.
const STOPWORDS: &[&str] = &[
    "the", "and", "for", "that", "this", "with", "you", "are", "was", "have", "not", "but", "can",
    "what", "from", "your", "will", "there", "their", "they", "about", "would", "which", "when",
    "make", "like", "just", "into", "than", "then", "them", "some", "could", "should", "please",
    "also", "more", "other", "only", "here", "does", "how", "why", "use", "now", "all", "any",
    "its", "it's", "our", "out", "has", "had", "who", "one", "get", "give", "let", "want", "need",
    "thanks", "thank", "yes", "well", "very", "these", "those", "been", "were", "being",
];

const CODE_WORDS: &[&str] = &[
    "code",
    "function",
    "functions",
    "bug",
    "bugs",
    "error",
    "errors",
    "compile",
    "compiler",
    "exception",
    "stack",
    "traceback",
    "class",
    "method",
    "refactor",
    "implement",
    "debug",
    "test",
    "tests",
    "script",
    "syntax",
    "snippet",
    "fix",
    "crash",
    "panic",
    "variable",
    "struct",
    "module",
    "rust",
    "python",
    "javascript",
    "typescript",
    "java",
    "golang",
    "sql",
    "regex",
    "api",
    "fn",
    "def",
];

const DOCUMENT_WORDS: &[&str] = &[
    "document",
    "doc",
    "article",
    "text",
    "above",
    "file",
    "paste",
    "pasted",
    "attached",
    "attachment",
    "report",
    "transcript",
    "email",
    "paper",
    "pdf",
    "essay",
    "summarize",
    "summarise",
    "summary",
    "contract",
    "excerpt",
    "passage",
    "chapter",
    "log",
    "logs",
];

const EMPTY: u16 = u16::MAX;

impl Query {
    fn of(message: &Value) -> Self {
        let mut q = Query {
            slots: vec![EMPTY; MAX_QUERY_WORDS * 2],
            ..Query::default()
        };
        for_each_text(message, &mut |text| {
            q.code |= for_each_word(text.as_bytes(), &mut |h, word| {
                let is =
                    |list: &[&str]| list.iter().any(|w| w.as_bytes().eq_ignore_ascii_case(word));
                q.code |= is(CODE_WORDS);
                q.document |= is(DOCUMENT_WORDS);
                if word.len() >= 3 && q.words.len() < MAX_QUERY_WORDS && !is(STOPWORDS) {
                    q.insert(h);
                }
            });
        });
        q
    }

    fn slot(&self, h: u64) -> usize {
        (h >> 32) as usize & (self.slots.len() - 1)
    }

    fn insert(&mut self, h: u64) {
        let mut s = self.slot(h);
        loop {
            match self.slots[s] {
                EMPTY => {
                    self.slots[s] = self.words.len() as u16;
                    self.words.push(h);
                    return;
                }
                i if self.words[usize::from(i)] == h => return,
                _ => s = (s + 1) & (self.slots.len() - 1),
            }
        }
    }

    fn get(&self, h: u64) -> Option<usize> {
        if self.words.is_empty() {
            return None;
        }
        let mut s = self.slot(h);
        loop {
            match self.slots[s] {
                EMPTY => return None,
                i if self.words[usize::from(i)] == h => return Some(usize::from(i)),
                _ => s = (s + 1) & (self.slots.len() - 1),
            }
        }
    }
}

/// Bytes that make words: ASCII letters and digits, `_`, and every non-ASCII byte (so words
/// of any script).
static WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
        i += 1;
    }
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The high bit of each byte of `x` below 0x80 that is at least `n` (1..=0x80); exact per byte
/// (no carry crosses bytes).
fn swar_ge7(x: u64, n: u8) -> u64 {
    (x + ONES * u64::from(0x80 - n)) & HIGH
}

/// The high bit of each byte of `x` equal to `c`; exact per byte.
fn swar_eq(x: u64, c: u8) -> u64 {
    let y = x ^ (ONES * u64::from(c));
    !(((y & LOW7) + LOW7) | y) & HIGH
}

/// The high bits of 8 bytes, packed into the low 8 bits (byte `i` to bit `i`).
fn swar_pack(m: u64) -> u64 {
    ((m >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// Word bytes and backticks among 8 bytes (little-endian), as two 8-bit masks.
fn classify8(x: u64) -> (u64, u64) {
    let lo7 = x & LOW7;
    let digit = swar_ge7(lo7, b'0') & !swar_ge7(lo7, b'9' + 1);
    let folded = lo7 | (ONES * 0x20);
    let letter = swar_ge7(folded, b'a') & !swar_ge7(folded, b'z' + 1);
    let word = digit | letter | swar_eq(x, b'_') | (x & HIGH);
    (swar_pack(word), swar_pack(swar_eq(x, b'`')))
}

/// Calls `f` with the words of 2 to 40 bytes (longer runs are identifiers, hashes or encoded
/// data), each with a case-insensitive hash ([`word_hash`]); says whether the text has a code
/// fence (three backticks). Bytes are classified 8 at a time into 64-byte bit masks and words
/// are read off the masks, so the cost per byte is a few arithmetic operations, not a branch.
fn for_each_word(text: &[u8], f: &mut impl FnMut(u64, &[u8])) -> bool {
    let mut emit = |start: usize, end: usize| {
        if (2..=40).contains(&(end - start)) {
            f(word_hash(text, start, end), &text[start..end]);
        }
    };
    // Where the word being read started, if it goes on from an earlier block.
    let mut open: Option<usize> = None;
    let (mut fence, mut last_ticks, mut last_mask) = (false, 0u64, 0u64);
    for (k, block) in text.chunks(64).enumerate() {
        let base = k * 64;
        let (mut mask, mut ticks) = (0u64, 0u64);
        let mut eights = block.chunks_exact(8);
        for (j, eight) in eights.by_ref().enumerate() {
            let (w, t) = classify8(u64::from_le_bytes(eight.try_into().unwrap_or([0; 8])));
            mask |= w << (8 * j);
            ticks |= t << (8 * j);
        }
        let done = block.len() - eights.remainder().len();
        for (j, &b) in eights.remainder().iter().enumerate() {
            mask |= u64::from(WORD_BYTE[usize::from(b)]) << (done + j);
            ticks |= u64::from(b == b'`') << (done + j);
        }
        // Three backticks in a row, within the block or across its start.
        let across = (ticks << 2) | (last_ticks >> 62);
        fence |=
            ticks & (ticks >> 1) & (ticks >> 2) != 0 || across & (across >> 1) & (across >> 2) != 0;
        last_ticks = ticks;

        // Words start where a word byte follows a separator and end (exclusive) where a
        // separator follows a word byte; a word can go on across blocks.
        let carry = last_mask >> 63;
        let mut starts = mask & !((mask << 1) | carry);
        let mut ends = !mask & ((mask << 1) | carry);
        last_mask = mask;
        if let Some(start) = open {
            if ends == 0 {
                continue;
            }
            emit(start, base + ends.trailing_zeros() as usize);
            ends &= ends - 1;
            open = None;
        }
        while starts != 0 {
            let start = base + starts.trailing_zeros() as usize;
            starts &= starts - 1;
            if ends == 0 {
                open = Some(start);
                break;
            }
            emit(start, base + ends.trailing_zeros() as usize);
            ends &= ends - 1;
        }
    }
    if let Some(start) = open {
        emit(start, text.len());
    }
    fence
}

/// `MASKS[n]` keeps the first `n` bytes of a little-endian word.
const MASKS: [u64; 9] = {
    let mut m = [0u64; 9];
    let mut n = 1;
    while n < 9 {
        m[n] = u64::MAX >> (64 - 8 * n);
        n += 1;
    }
    m
};

/// A hash of `text[start..end]` that ignores ASCII case: 8 bytes at a time, each byte ORed with
/// 0x20 (which lowercases letters and leaves digits alone; `_` and non-ASCII bytes change the
/// same way wherever they occur), mixed by multiplication, with the length. Words of up to 16
/// bytes (nearly all) take two masked loads and no branch on their length.
fn word_hash(text: &[u8], start: usize, end: usize) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let len = end - start;
    let mut pair = [0u8; 16];
    let sixteen: &[u8; 16] = match text.get(start..start + 16) {
        Some(s) => s.try_into().unwrap_or(&pair),
        None => {
            let n = (text.len() - start).min(16);
            pair[..n].copy_from_slice(&text[start..start + n]);
            &pair
        }
    };
    let (a, b) = sixteen.split_at(8);
    let a = u64::from_le_bytes(a.try_into().unwrap_or([0; 8])) & MASKS[len.min(8)];
    let b = u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) & MASKS[len.clamp(8, 16) - 8];
    let mut h = (len as u64).wrapping_mul(K) ^ (a | LOWER);
    h = h.wrapping_mul(K);
    h ^= (h >> 29) ^ (b | LOWER);
    h = h.wrapping_mul(K);
    let mut at = start + 16;
    while at < end {
        let n = (end - at).min(8);
        let mut eight = [0u8; 8];
        eight[..n].copy_from_slice(&text[at..at + n]);
        h ^= (h >> 29) ^ (u64::from_le_bytes(eight) | LOWER);
        h = h.wrapping_mul(K);
        at += n;
    }
    (h ^ (h >> 32)).wrapping_mul(K)
}

/// The text a message carries: its content (a string or text parts), and the names and
/// arguments of the tools it calls. Images and other media are not text.
fn for_each_text<'a>(m: &'a Value, f: &mut impl FnMut(&'a str)) {
    match m.get("content") {
        Some(Value::String(s)) => f(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    f(t);
                }
            }
        }
        _ => {}
    }
    let calls = m.get("tool_calls").and_then(Value::as_array);
    let functions = calls
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("function"))
        .chain(m.get("function_call"));
    for call in functions {
        for k in ["name", "arguments"] {
            if let Some(t) = call.get(k).and_then(Value::as_str) {
                f(t);
            }
        }
    }
}

fn text_len(m: &Value) -> usize {
    let mut n = 0;
    for_each_text(m, &mut |t| n += t.len());
    n
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

/// The validated request's messages.
fn messages(body: &Map<String, Value>) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn to_tokens(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Serialised bytes of the body but its messages: with the messages' [`message_bytes`] added,
/// the body's length. (`{…}` and the commas between fields, `"messages":` and its brackets less
/// one comma, counted once per message instead.)
fn fixed_bytes(body: &Map<String, Value>) -> usize {
    let others: usize = body
        .iter()
        .filter(|(k, _)| k.as_str() != "messages")
        .map(|(k, v)| string_len(k) + 1 + json_len(v))
        .sum();
    2 + body.len().saturating_sub(1) + others + string_len("messages") + 1 + 1
}

/// A message's serialised length plus the comma after it.
fn message_bytes(m: &Value) -> usize {
    json_len(m) + 1
}

/// The length of `v` serialised as compact JSON; see [`tokens`] for what is approximate.
pub fn json_len(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(b) => 4 + usize::from(!b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => digits(u),
            (None, Some(i)) => 1 + digits(i.unsigned_abs()),
            _ => 8,
        },
        Value::String(s) => string_len(s),
        Value::Array(a) => 2 + a.len().saturating_sub(1) + a.iter().map(json_len).sum::<usize>(),
        Value::Object(o) => {
            2 + o.len().saturating_sub(1)
                + o.iter()
                    .map(|(k, v)| string_len(k) + 1 + json_len(v))
                    .sum::<usize>()
        }
    }
}

fn digits(u: u64) -> usize {
    u.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// A string's serialised length: quotes, and one extra byte per character JSON escapes
/// (control characters other than `\n`, `\r`, `\t`, `\b`, `\f` take five, counted as one).
/// Counted 8 bytes at a time.
fn string_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut escapes = 0u64;
    let mut eights = bytes.chunks_exact(8);
    for eight in eights.by_ref() {
        let x = u64::from_le_bytes(eight.try_into().unwrap_or([0; 8]));
        // Below 0x20: neither the high bit nor a carry when 0x60 is added to the low 7 bits.
        let control = !(((x & LOW7) + ONES * 0x60) | x) & HIGH;
        let m = control | swar_eq(x, b'"') | swar_eq(x, b'\\');
        escapes += (m >> 7).wrapping_mul(ONES) >> 56;
    }
    let rest = eights
        .remainder()
        .iter()
        .filter(|&&b| b < 0x20 || b == b'"' || b == b'\\')
        .count();
    s.len() + 2 + escapes as usize + rest
}

/// What [`shape`] did to a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Shaped {
    /// The shaped request; `None` when nothing needed changing.
    pub request: Option<ChatRequest>,
    /// One line per change, for the audit log.
    pub notes: Vec<String>,
}

/// Most bytes of a JSON schema quoted in an instruction.
pub const MAX_SCHEMA_BYTES: usize = 4_096;

/// Asks for JSON in words, where the model has no JSON mode.
pub const JSON_OBJECT_INSTRUCTION: &str =
    "Respond with a single JSON object only: no text before or after it, no code fences.";

/// Adapts `request` to a model with `caps` that takes a system role or not (`system_role`):
///
/// 1. JSON mode. `response_format: json_object` for a model without JSON mode, or
///    `json_schema` for one without structured outputs, becomes a system instruction to answer
///    with a JSON object only (quoting the schema, compact, at most [`MAX_SCHEMA_BYTES`]); a
///    schema is downgraded to `json_object` where the model has JSON mode, otherwise the field
///    is dropped. The instruction goes after the leading system messages.
/// 2. System placement. Without a system role, the system and developer messages (the
///    instruction included) are folded, in order and separated by blank lines, in front of the
///    first user message (one is added at the front when there is none).
///
/// Everything else in the body is left as it is.
pub fn shape(request: &ChatRequest, caps: &Caps, system_role: bool) -> Shaped {
    let body = request.body();
    let msgs = messages(body);
    let mut notes = Vec::new();

    // What becomes of `response_format`: None to keep it, Some(None) to drop it.
    let mut format: Option<Option<Value>> = None;
    let mut instruction = None;
    match response_format(body.get("response_format")) {
        Format::JsonObject if !caps.json_mode => {
            format = Some(None);
            instruction = Some(JSON_OBJECT_INSTRUCTION.to_owned());
            notes.push(
                "response_format json_object dropped (the model has no JSON mode): asked for \
                 in a system instruction"
                    .into(),
            );
        }
        Format::Schema { name, schema } if !caps.json_schema => {
            let (text, truncated) = compact_schema(schema);
            let named = if name.is_empty() {
                String::new()
            } else {
                format!(" (\"{name}\")")
            };
            instruction = Some(format!(
                "Respond with a single JSON object only: no text before or after it, no code \
                 fences. It must conform to this JSON Schema{named}:\n{text}"
            ));
            let downgrade = if caps.json_mode {
                format = Some(Some(json!({"type": "json_object"})));
                "downgraded to json_object"
            } else {
                format = Some(None);
                "dropped"
            };
            notes.push(format!(
                "response_format json_schema {downgrade} (the model has no structured outputs): \
                 the schema is asked for in a system instruction"
            ));
            if truncated {
                notes.push(format!(
                    "the schema is cut to {MAX_SCHEMA_BYTES} bytes in the instruction"
                ));
            }
        }
        _ => {}
    }
    let systems = msgs
        .iter()
        .filter(|m| matches!(role(m), "system" | "developer"))
        .count();
    let instructed = instruction.is_some();
    let fold = !system_role && (systems > 0 || instructed);
    if format.is_none() && !fold {
        return Shaped {
            request: None,
            notes,
        };
    }

    let shaped = request.with_body(|body| {
        match format {
            Some(Some(v)) => {
                body.insert("response_format".into(), v);
            }
            Some(None) => {
                body.remove("response_format");
            }
            None => {}
        }
        let mut out = msgs.to_vec();
        if let Some(text) = instruction {
            let lead = out
                .iter()
                .take_while(|m| matches!(role(m), "system" | "developer"))
                .count();
            out.insert(lead, json!({"role": "system", "content": text}));
        }
        if fold {
            fold_system(&mut out);
        }
        out
    });
    if fold {
        notes.push(format!(
            "{} system/developer messages folded into the first user message (the model takes \
             no system role)",
            systems + usize::from(instructed)
        ));
    }
    Shaped {
        request: Some(shaped),
        notes,
    }
}

/// Moves every system and developer message, in order, in front of the first user message.
fn fold_system(out: &mut Vec<Value>) {
    let mut texts = Vec::new();
    out.retain(|m| {
        if !matches!(role(m), "system" | "developer") {
            return true;
        }
        let mut parts = Vec::new();
        match m.get("content") {
            Some(Value::String(s)) => parts.push(s.as_str()),
            Some(Value::Array(a)) => parts.extend(
                a.iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str)),
            ),
            _ => {}
        }
        let text = parts.join("\n");
        if !text.trim().is_empty() {
            texts.push(text);
        }
        false
    });
    if texts.is_empty() {
        return;
    }
    let prefix = texts.join("\n\n");
    let Some(user) = out.iter_mut().find(|m| role(m) == "user") else {
        out.insert(0, json!({"role": "user", "content": prefix}));
        return;
    };
    match user.get_mut("content") {
        Some(Value::String(s)) => *s = format!("{prefix}\n\n{s}"),
        Some(Value::Array(parts)) => {
            let first_text = parts
                .first_mut()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .and_then(|p| p.get_mut("text"))
                .and_then(|t| match t {
                    Value::String(s) => Some(s),
                    _ => None,
                });
            match first_text {
                Some(s) => *s = format!("{prefix}\n\n{s}"),
                None => parts.insert(0, json!({"type": "text", "text": prefix})),
            }
        }
        _ => {
            if let Some(o) = user.as_object_mut() {
                o.insert("content".into(), Value::String(prefix));
            }
        }
    }
}

/// `response_format`, as far as shaping cares.
enum Format<'a> {
    Other,
    JsonObject,
    Schema { name: &'a str, schema: &'a Value },
}

fn response_format(v: Option<&Value>) -> Format<'_> {
    let Some(o) = v.and_then(Value::as_object) else {
        return Format::Other;
    };
    match o.get("type").and_then(Value::as_str) {
        Some("json_object") => Format::JsonObject,
        Some("json_schema") => {
            let js = o.get("json_schema");
            match js.and_then(|j| j.get("schema")).filter(|s| s.is_object()) {
                Some(schema) => Format::Schema {
                    name: js
                        .and_then(|j| j.get("name"))
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    schema,
                },
                // A schema-less json_schema asks for JSON and nothing more (as the adapters read it).
                None => Format::JsonObject,
            }
        }
        _ => Format::Other,
    }
}

/// The schema as compact JSON, cut at [`MAX_SCHEMA_BYTES`] (on a character boundary, with "…").
fn compact_schema(schema: &Value) -> (String, bool) {
    let mut s = serde_json::to_string(schema).unwrap_or_default();
    if s.len() <= MAX_SCHEMA_BYTES {
        return (s, false);
    }
    let mut end = MAX_SCHEMA_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    (s, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::estimate_prompt_tokens;

    fn req(body: Value) -> ChatRequest {
        ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    fn conv(messages: Value) -> ChatRequest {
        req(json!({"model": "auto", "messages": messages}))
    }

    fn msg(role: &str, content: &str) -> Value {
        json!({"role": role, "content": content})
    }

    /// `n` bytes of words that say nothing in particular.
    fn filler(n: usize, seed: usize) -> String {
        const W: &[&str] = &[
            "lorem",
            "ipsum",
            "dolor",
            "sit",
            "amet",
            "consectetur",
            "elit",
        ];
        let mut s = String::new();
        let mut i = seed;
        while s.len() < n {
            s.push_str(W[i % W.len()]);
            s.push(' ');
            i = i.wrapping_mul(31).wrapping_add(7);
        }
        s
    }

    fn trimmed(f: Fit) -> Trimmed {
        match f {
            Fit::Trimmed(t) => t,
            other => panic!("expected a trim, got {other:?}"),
        }
    }

    fn sent(r: &ChatRequest) -> &[Value] {
        r.body()["messages"].as_array().unwrap()
    }

    #[test]
    fn tokens_match_the_quota_estimate_of_the_serialised_body() {
        let r = req(json!({
            "model": "auto", "max_tokens": 300, "stream": false, "n": -1,
            "messages": [
                msg("system", "Be \"brief\".\n\tNo \\ fluff."),
                {"role": "user", "content": [{"type": "text", "text": "héllo ✓"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
        }));
        let bytes = serde_json::to_vec(r.body()).unwrap().len();
        assert_eq!(u64::from(tokens(&r)), estimate_prompt_tokens(bytes));
        for v in [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-17),
            json!(12345),
            json!([]),
            json!({}),
            json!([1, "a\u{1}"]),
        ] {
            let exact = serde_json::to_string(&v).unwrap().len();
            // Control characters without a short escape take 5 extra bytes, counted as 1.
            let slack = if v.is_array() && v.as_array().unwrap().len() == 2 {
                4
            } else {
                0
            };
            assert_eq!(json_len(&v) + slack, exact, "{v}");
        }
    }

    #[test]
    fn words_are_read_across_blocks_whatever_their_case() {
        let naive = |t: &str| -> Vec<String> {
            t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii()))
                .filter(|w| (2..=40).contains(&w.len()))
                .map(str::to_owned)
                .collect()
        };
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(
                [
                    "Ab",
                    "c",
                    "naïve",
                    "x_y9",
                    "Ünïcödé",
                    "THE",
                    &"w".repeat(i % 50),
                    "--",
                    " ",
                    "\n",
                ][i % 10],
            );
            text.push(if i % 7 == 0 { '.' } else { ' ' });
            for cut in [0, 1, 63, 64, 65, text.len()] {
                let mut cut = cut.min(text.len());
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                let t = &text[..cut];
                let mut got = Vec::new();
                for_each_word(t.as_bytes(), &mut |_, w| {
                    got.push(String::from_utf8(w.to_vec()).unwrap())
                });
                assert_eq!(got, naive(t), "{t:?}");
            }
        }
        let hash = |w: &str| word_hash(w.as_bytes(), 0, w.len());
        assert_eq!(hash("Tokenizer"), hash("tokenizer"));
        assert_eq!(hash("NAÏVE_1"), hash("naÏve_1"));
        assert_ne!(hash("tokenizer"), hash("tokenizers"));
        assert_ne!(hash("ab"), hash("ba"));
        let padded = b"lexer_state machine";
        assert_eq!(word_hash(padded, 0, 11), hash("LEXER_STATE"));
    }

    #[test]
    fn the_8_byte_classifiers_agree_with_the_byte_tables() {
        for b in 0..=255u8 {
            for pos in 0..8 {
                let mut eight = [b'a'; 8];
                eight[pos] = b;
                let (word, ticks) = classify8(u64::from_le_bytes(eight));
                assert_eq!(word >> pos & 1 == 1, WORD_BYTE[usize::from(b)], "{b:#x}");
                assert_eq!(ticks, u64::from(b == b'`') << pos, "{b:#x}");
                let mut sixteen = [b'x'; 16];
                sixteen[pos * 2] = b;
                if let Ok(s) = std::str::from_utf8(&sixteen) {
                    let exact = serde_json::to_string(s).unwrap().len();
                    let slack = if b < 0x20 && !b"\n\r\t\x08\x0c".contains(&b) {
                        4
                    } else {
                        0
                    };
                    assert_eq!(string_len(s) + slack, exact, "{b:#x}");
                }
            }
        }
        for at in [0, 5, 60, 61, 62, 63, 64, 100] {
            let mut t = "a".repeat(130);
            t.replace_range(at..at + 3, "```");
            assert!(for_each_word(t.as_bytes(), &mut |_, _| {}), "{at}");
            t.replace_range(at + 1..at + 2, " ");
            assert!(!for_each_word(t.as_bytes(), &mut |_, _| {}), "{at}");
        }
    }

    #[test]
    fn fits_trims_or_is_too_large() {
        let r = conv(json!([
            msg("system", "s"),
            msg("user", &filler(4000, 1)),
            msg("assistant", &filler(4000, 2)),
            msg("user", "and now?")
        ]));
        let t = tokens(&r);
        assert_eq!(fit(&r, t + 100, 100), Fit::Fits);
        assert_eq!(fit(&r, t, 0), Fit::Fits);
        let tr = trimmed(fit(&r, 1500, 100));
        assert_eq!(tr.before_tokens, t);
        assert_eq!(tr.after_tokens, tokens(&tr.request));
        assert!(tr.after_tokens <= 1400, "{}", tr.after_tokens);
        assert_eq!(
            tr.dropped,
            [1],
            "the first user message is bigger than the reply after it"
        );
        assert_eq!(tr.reasons.len(), 3, "{:?}", tr.reasons);
        let s = tr.summary();
        assert_eq!(s["dropped"], json!([1]));
        assert_eq!(s["before_tokens"], t);
        assert!(s.get("request").is_none());
        // Nothing can go but the two older turns: system + note + last user is the minimum.
        match fit(&r, 60, 30) {
            Fit::TooLarge { needed, window } => {
                assert_eq!(window, 60);
                let minimum = conv(json!([
                    msg("system", "s"),
                    omission_note(2),
                    msg("user", "and now?")
                ]));
                assert_eq!(needed, tokens(&minimum) + 30);
                assert!(matches!(fit(&r, needed, 30), Fit::Trimmed(_)));
            }
            other => panic!("{other:?}"),
        }
        // An answer reserve larger than the window leaves nothing.
        assert!(matches!(fit(&r, 100, 200), Fit::TooLarge { .. }));
    }

    #[test]
    fn system_messages_and_the_last_user_message_stay_and_a_note_says_what_went() {
        let mut m = vec![
            msg("system", "You are terse."),
            msg("developer", "Answer in French."),
        ];
        for i in 0..20 {
            m.push(msg(
                if i % 2 == 0 { "user" } else { "assistant" },
                &filler(400, i),
            ));
        }
        m.push(msg("system", "Mid-conversation rule."));
        m.push(msg("user", "Résume."));
        let r = conv(Value::Array(m.clone()));
        let tr = trimmed(fit(&r, 600, 0));
        let out = sent(&tr.request);
        assert_eq!(out[0], m[0]);
        assert_eq!(out[1], m[1]);
        assert_eq!(out[2], omission_note(tr.dropped.len()));
        assert!(out[2]["content"]
            .as_str()
            .unwrap()
            .contains(&format!("{} earlier messages omitted", tr.dropped.len())));
        assert_eq!(out[out.len() - 2], m[22]);
        assert_eq!(out[out.len() - 1], m[23]);
        assert_eq!(out.len() + tr.dropped.len(), m.len() + 1);
        assert!(tr.after_tokens <= 600 && tr.after_tokens == tokens(&tr.request));
        // The latest turns are kept first, newest first: the turn before the last user message.
        assert!(!tr.dropped.contains(&21) && !tr.dropped.contains(&20));
        // Kept messages stay in their order.
        let kept: Vec<&Value> = out.iter().filter(|v| **v != out[2]).collect();
        let expected: Vec<&Value> = m
            .iter()
            .enumerate()
            .filter(|(i, _)| !tr.dropped.contains(i))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn a_tool_call_and_its_results_go_together() {
        let call = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "search", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "search", "arguments": "{}"}}]});
        let small_call = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]});
        let m = vec![
            msg("user", "find things"),
            call,
            json!({"role": "tool", "tool_call_id": "a", "content": filler(2000, 1)}),
            json!({"role": "tool", "tool_call_id": "b", "content": "short"}),
            msg("assistant", "found"),
            msg("user", "what time is it"),
            small_call,
            json!({"role": "tool", "tool_call_id": "c", "content": "12:00"}),
        ];
        let r = conv(Value::Array(m.clone()));
        let tr = trimmed(fit(&r, 300, 0));
        // The big unit (call + both results) went as one; the pending call and its result stay.
        assert_eq!(tr.dropped, [1, 2, 3]);
        let out = sent(&tr.request);
        assert_eq!(out.last().unwrap(), &m[7]);
        assert_eq!(out[out.len() - 2], m[6]);
        for (i, v) in out.iter().enumerate() {
            if role(v) == "tool" {
                assert!(
                    out[..i]
                        .iter()
                        .rev()
                        .find(|p| role(p) != "tool")
                        .is_some_and(|p| p.get("tool_calls").is_some()),
                    "orphan tool message at {i}"
                );
            }
        }
        // Too small for even the pending tool result: too large, not a broken conversation.
        let big_result = conv(
            json!([msg("user", "go"), {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "x", "content": filler(4000, 3)}]),
        );
        assert!(matches!(fit(&big_result, 500, 0), Fit::TooLarge { .. }));
    }

    #[test]
    fn an_old_relevant_message_beats_a_more_recent_irrelevant_one() {
        let m = vec![
            msg("system", "You help with software."),
            msg("user", "Hello there."),
            msg(
                "assistant",
                &format!(
                    "The tokenizer splits quoted identifiers in the lexer_state machine. {}",
                    filler(600, 1)
                ),
            ),
            msg("user", "Unrelated: any weekend plans?"),
            msg("assistant", &filler(700, 2)),
            msg("user", "ok"),
            msg("assistant", "sure"),
            msg(
                "user",
                "Why does the tokenizer split quoted identifiers in lexer_state?",
            ),
        ];
        let r = conv(Value::Array(m.clone()));
        let all = tokens(&r);
        // Room for one of the two big messages only.
        let tr = trimmed(fit(&r, all - 120, 0));
        assert!(
            !tr.dropped.contains(&2),
            "{:?} {:?}",
            tr.dropped,
            tr.reasons
        );
        assert!(tr.dropped.contains(&4), "{:?}", tr.dropped);
        // The latest turn was kept first.
        assert!(!tr.dropped.contains(&5) && !tr.dropped.contains(&6));
    }

    #[test]
    fn code_documents_and_the_first_user_message_score() {
        let code = format!("```rust\nfn main() {{}}\n```\n{}", filler(600, 1));
        let paste = filler(2500, 2);
        let m = vec![
            msg("user", &format!("Here is my essay draft:\n{paste}")),
            msg("assistant", &code),
            msg("user", &filler(600, 3)),
            msg("assistant", &filler(600, 4)),
            msg("user", "x"),
            msg("assistant", "y"),
            msg("user", "Summarize the document above."),
        ];
        let r = conv(Value::Array(m.clone()));
        let t = trimmed(fit(&r, tokens(&r) - 200, 0));
        assert!(
            !t.dropped.contains(&0),
            "the pasted document is referenced: {:?}",
            t.dropped
        );
        assert!(t.reasons.iter().any(|r| r.contains("first user message")));
        let mut m2 = m.clone();
        m2[0] = msg("user", &filler(700, 5));
        m2[6] = msg("user", "The function fails to compile, fix it.");
        let r = conv(Value::Array(m2));
        let t = trimmed(fit(&r, tokens(&r) - 200, 0));
        assert!(
            !t.dropped.contains(&1),
            "the code block matters: {:?}",
            t.dropped
        );
    }

    #[test]
    fn fitting_is_deterministic() {
        let mut m = vec![msg("system", "s")];
        for i in 0..40 {
            m.push(msg(
                if i % 2 == 0 { "user" } else { "assistant" },
                &filler(300 + (i * 37) % 200, i),
            ));
        }
        m.push(msg("user", "lorem dolor"));
        let r = conv(Value::Array(m));
        let a = fit(&r, 1200, 200);
        for _ in 0..3 {
            assert_eq!(fit(&r.clone(), 1200, 200), a);
        }
    }

    #[test]
    fn a_256kb_conversation_fits_an_8k_window() {
        let mut m = vec![msg("system", &filler(1000, 0))];
        for i in 0..128 {
            m.push(msg(
                if i % 2 == 0 { "user" } else { "assistant" },
                &filler(2048, i),
            ));
        }
        m.push(msg("user", "Which dolor was consectetur?"));
        let r = conv(Value::Array(m.clone()));
        assert!(tokens(&r) > 64_000);
        let t = trimmed(fit(&r, 8192, 1024));
        assert!(t.after_tokens <= 8192 - 1024);
        assert_eq!(t.after_tokens, tokens(&t.request));
        assert!(
            t.after_tokens > 6000,
            "the budget is used: {}",
            t.after_tokens
        );
        let out = sent(&t.request);
        assert_eq!(out[0], m[0]);
        assert_eq!(out.last(), m.last());
        assert!(!t.dropped.contains(&128), "the latest turn stays");
    }

    fn caps(json_mode: bool, json_schema: bool) -> Caps {
        Caps {
            json_mode,
            json_schema,
            ..Caps::default()
        }
    }

    #[test]
    fn json_mode_becomes_an_instruction_where_the_model_lacks_it() {
        let object = req(
            json!({"model": "m", "temperature": 0, "response_format": {"type": "json_object"}, "messages": [msg("system", "s"), msg("user", "u")]}),
        );
        assert_eq!(
            shape(&object, &caps(true, false), true),
            Shaped {
                request: None,
                notes: vec![]
            }
        );
        let s = shape(&object, &caps(false, false), true);
        let r = s.request.unwrap();
        assert!(r.body().get("response_format").is_none());
        assert_eq!(r.body()["temperature"], 0);
        assert_eq!(sent(&r)[1], msg("system", JSON_OBJECT_INSTRUCTION));
        assert_eq!(s.notes.len(), 1);

        let schema =
            json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
        let with_schema = req(
            json!({"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}, "messages": [msg("user", "u")]}),
        );
        assert!(shape(&with_schema, &caps(true, true), true)
            .request
            .is_none());
        // JSON mode but no schemas: downgraded, the schema in words.
        let r = shape(&with_schema, &caps(true, false), true)
            .request
            .unwrap();
        assert_eq!(r.body()["response_format"], json!({"type": "json_object"}));
        let text = sent(&r)[0]["content"].as_str().unwrap();
        assert!(
            text.contains(&serde_json::to_string(&schema).unwrap()) && text.contains("\"thing\""),
            "{text}"
        );
        assert_eq!(sent(&r)[1], msg("user", "u"));
        // Neither: dropped.
        let r = shape(&with_schema, &caps(false, false), true)
            .request
            .unwrap();
        assert!(r.body().get("response_format").is_none());
        // A huge schema is cut.
        let big = json!({"type": "object", "description": "é".repeat(5000)});
        let huge = req(
            json!({"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "h", "schema": big}}, "messages": [msg("user", "u")]}),
        );
        let s = shape(&huge, &caps(true, false), true);
        assert!(
            sent(s.request.as_ref().unwrap())[0]["content"]
                .as_str()
                .unwrap()
                .len()
                < MAX_SCHEMA_BYTES + 300
        );
        assert_eq!(s.notes.len(), 2);
        // Text formats and malformed ones are not shaping's business.
        let text_format = req(
            json!({"model": "m", "response_format": {"type": "text"}, "messages": [msg("user", "u")]}),
        );
        assert!(shape(&text_format, &caps(false, false), true)
            .request
            .is_none());
    }

    #[test]
    fn system_messages_fold_into_the_first_user_message() {
        let r = req(
            json!({"model": "m", "messages": [msg("system", "Be brief."), msg("developer", "Use French."), msg("user", "Hi"), msg("assistant", "Salut"), msg("user", "Bye")]}),
        );
        assert!(shape(&r, &Caps::default(), true).request.is_none());
        let s = shape(&r, &Caps::default(), false);
        let out = sent(s.request.as_ref().unwrap()).to_vec();
        assert_eq!(
            out,
            [
                msg("user", "Be brief.\n\nUse French.\n\nHi"),
                msg("assistant", "Salut"),
                msg("user", "Bye")
            ]
        );
        assert_eq!(s.notes.len(), 1);
        // Content parts: the first text part takes the prefix.
        let parts = req(
            json!({"model": "m", "messages": [msg("system", "S"), {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}, {"type": "text", "text": "what?"}]}]}),
        );
        let out = sent(
            shape(&parts, &Caps::default(), false)
                .request
                .as_ref()
                .unwrap(),
        )
        .to_vec();
        assert_eq!(out[0]["content"][0], json!({"type": "text", "text": "S"}));
        assert_eq!(out[0]["content"].as_array().unwrap().len(), 3);
        // With a JSON instruction too, and a fit note: all folded, in order.
        let j = req(
            json!({"model": "m", "response_format": {"type": "json_object"}, "messages": [msg("system", "S"), omission_note(3), msg("user", "U")]}),
        );
        let out = sent(shape(&j, &Caps::default(), false).request.as_ref().unwrap()).to_vec();
        assert_eq!(out.len(), 1);
        let text = out[0]["content"].as_str().unwrap();
        assert!(
            text.starts_with("S\n\n[FreeRelay: 3 earlier messages omitted")
                && text.ends_with(&format!("{JSON_OBJECT_INSTRUCTION}\n\nU")),
            "{text}"
        );
    }
}
