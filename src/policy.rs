//! Tenant policies: a small line-oriented language in which a tenant prefers or excludes
//! providers, caps the temperature, requires capabilities, forces a mode, sets cacheability and
//! turns hedging on, each rule optionally conditioned on the request's [`Profile`].
//!
//! A policy is parsed once ([`parse`], which reports every error with its line, column and what
//! was expected), stored per tenant under [`key`], and evaluated per request
//! ([`Policy::evaluate`]): a walk over pre-compiled conditions (enumerated dimensions are bit
//! masks, numbers are compared as `f64`) that allocates nothing but the [`Effects`] it returns.
//!
//! # Grammar
//!
//! One rule per line; blank lines and `#` comments (to the end of the line) are ignored.
//! Keywords, dimension names, values and provider ids are case-insensitive; model ids are not.
//!
//! ```text
//! policy      = { line } ;
//! line        = [ rule ] [ "#" { any character } ] newline ;
//! rule        = [ "when" condition ":" ] action { ";" action } ;
//!
//! condition   = conjunction { "or" conjunction } ;
//! conjunction = negation { "and" negation } ;
//! negation    = "not" negation | "(" condition ")" | test ;
//! test        = flag
//!             | scale ( "=" | "!=" ) name
//!             | ordered ( "<" | "<=" | ">" | ">=" ) name
//!             | number_dim ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) number
//!             | ( scale | number_dim ) [ "not" ] "in" "(" value { "," value } ")" ;
//!
//! flag        = "background" | "tool_forced" | "seed" | "json" ;
//! scale       = "family" | "background" | "latency" | "output" | "tier" | "mode" | "budget"
//!             | "tool_forced" | "seed" | "json" | ordered ;
//! ordered     = "depth" | "precision" | "security" ;
//! number_dim  = "tokens" | "turns" | "documents" | "code_blocks" | "images" | "tools"
//!             | "temperature" ;
//! name        = ( letter | "_" ) { letter | digit | "_" } ;    (* a value of the dimension *)
//! value       = name | number ;
//! number      = digit { digit } [ "." digit { digit } ] ;
//!
//! action      = ( "prefer" | "exclude" ) target { "," target }
//!             | "cap" "temperature" number                   (* from 0 to 2 *)
//!             | "require" capability { "," capability }
//!             | "mode" ( "auto" | "free" | "paid" )
//!             | "cache" ( "on" | "off" )
//!             | "hedge" ( "on" | "off" ) ;
//! target      = provider [ "/" model ] ;
//! provider    = (* a catalogue id, or "custom" *) ;
//! model       = (* one or more characters but blanks, ",", ";" and "#" *) ;
//! capability  = "tools" | "json_mode" | "json_schema" | "vision" | "reasoning" ;
//! ```
//!
//! `not` binds tighter than `and`, which binds tighter than `or`. A policy holds at most
//! [`MAX_RULES`] rules and [`MAX_POLICY_BYTES`] bytes; a condition nests at most
//! [`MAX_NESTING`] `(` and `not`. Names per dimension:
//!
//! | dimension | values |
//! | --- | --- |
//! | `family` | `chat`, `code`, `math`, `extraction`, `summarisation`, `translation`, `creative`, `reasoning`, `classification`, `tool_use`, `background` |
//! | `background` | bare: a client's housekeeping call; or `title`, `tags`, `follow_ups`, `autocomplete`, `query_generation`, `other` |
//! | `depth`, `precision` | `low` < `medium` < `high` |
//! | `security` | `public` < `pii` < `secrets` |
//! | `latency` | `interactive`, `standard`, `background` |
//! | `output` | `free_text`, `json`, `json_schema`, `code` |
//! | `tier` | `free`, `paid` (the tier the request calls for) |
//! | `mode` | `auto`, `free`, `paid` (the mode the client asked for) |
//! | `budget` | `healthy`, `lean`, `spent` |
//! | `tool_forced`, `seed`, `json` | bare: true; or `= true`, `= false` |
//! | `tokens`, `turns`, `documents`, `code_blocks`, `images`, `tools` (defined), `temperature` | numbers |
//!
//! `!=` and `not in` are the negations of `=` and `in`, with one exception: a request that sets
//! no temperature matches no comparison on `temperature` at all (`!=` and `not in` included);
//! `not (temperature > 1)` does match it. `background = title` holds only for background
//! calls, so `background != title` holds for every other request.
//!
//! # Example
//!
//! ```text
//! # every tenant request
//! exclude nvidia, openrouter/meta-llama/llama-3.3-70b-instruct:free
//! prefer groq, gemini
//! cap temperature 0.7
//! when family = code and depth >= medium: prefer anthropic/claude-sonnet-4-5, openai
//! when family in (math, reasoning): mode paid
//! when background: mode free; cache on
//! when security >= pii: exclude openrouter, nvidia
//! when output = json_schema: require json_schema
//! when depth = high and not (latency = background): hedge on
//! when tokens > 30000: prefer gemini
//! ```
//!
//! # Combining
//!
//! The rules whose condition holds fire in file order: `prefer` lists concatenate (a target
//! keeps the position of its first mention), `exclude` and `require` accumulate, the
//! temperature cap is the lowest one, and `mode`, `cache` and `hedge` take the value of the last
//! rule that set them. An exclusion beats a preference ([`Effects::allows`] is checked first).

use crate::catalog::{Caps, Tier, CUSTOM, PROVIDERS};
use crate::profile::{Background, BudgetHealth, Family, Latency, Level, Output, Profile, Security};
use crate::route::Mode;
use serde::Serialize;
use std::fmt;

/// The largest policy text accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 65_536;

/// The most rules a policy may hold.
pub const MAX_RULES: usize = 256;

/// The deepest nesting of `(` and `not` in one condition (keeps parsing and evaluation off the
/// end of a wasm stack).
pub const MAX_NESTING: usize = 32;

/// `policy:v1:<tenant_id>` — the tenant's policy text, as it was stored (UTF-8, at most
/// [`MAX_POLICY_BYTES`]); parsed again when read.
pub fn key(tenant_id: &str) -> String {
    format!("policy:v1:{tenant_id}")
}

// ---------------------------------------------------------------------------------------------
// Public types.

/// A parsed policy: its rules in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// A syntax or value error, at a 1-based line and column (counted in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub line: u32,
    pub column: u32,
    /// What would have been valid there, e.g. `a provider id (groq, gemini, …)`.
    pub expected: String,
    /// The text found there; empty at the end of the line (or where a comment starts).
    pub found: String,
}

impl PolicyError {
    /// `expected …, found "…"` (or `found end of line`): the message without its position.
    pub fn message(&self) -> String {
        if self.found.is_empty() {
            format!("expected {}, found end of line", self.expected)
        } else {
            format!("expected {}, found {:?}", self.expected, self.found)
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line,
            self.column,
            self.message()
        )
    }
}

impl std::error::Error for PolicyError {}

/// A provider, or one model of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Target {
    /// A catalogue id (or `custom`), lower case.
    pub provider: String,
    /// The model id as the provider spells it; `None`: every model of the provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Target {
    /// Whether this target names `provider`'s `model`.
    pub fn matches(&self, provider: &str, model: &str) -> bool {
        self.provider == provider && self.model.as_deref().is_none_or(|m| m == model)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(m) => write!(f, "{}/{m}", self.provider),
            None => f.write_str(&self.provider),
        }
    }
}

/// A capability a model must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Tools,
    JsonMode,
    JsonSchema,
    Vision,
    Reasoning,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::Tools,
        Capability::JsonMode,
        Capability::JsonSchema,
        Capability::Vision,
        Capability::Reasoning,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Tools => "tools",
            Capability::JsonMode => "json_mode",
            Capability::JsonSchema => "json_schema",
            Capability::Vision => "vision",
            Capability::Reasoning => "reasoning",
        }
    }

    /// Whether a model with `caps` has this capability.
    pub fn met_by(self, caps: &Caps) -> bool {
        match self {
            Capability::Tools => caps.tools,
            Capability::JsonMode => caps.json_mode,
            Capability::JsonSchema => caps.json_schema,
            Capability::Vision => caps.vision,
            Capability::Reasoning => caps.reasoning,
        }
    }
}

/// What the rules that fired for one request ask of the router.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Effects {
    /// Targets to try first, in this order.
    pub prefer: Vec<Target>,
    /// Targets never to try.
    pub exclude: Vec<Target>,
    /// The highest temperature to send upstream.
    pub max_temperature: Option<f64>,
    /// Capabilities every candidate model must have.
    pub require: Vec<Capability>,
    /// The mode forced on the request.
    pub mode: Option<Mode>,
    /// Whether the answer may be cached (`None`: the gateway's default).
    pub cache: Option<bool>,
    /// Whether to hedge (`None`: the gateway's default).
    pub hedge: Option<bool>,
    /// The rules that fired, in file order.
    pub fired: Vec<Fired>,
}

impl Effects {
    /// Whether no exclusion names `provider`'s `model`.
    pub fn allows(&self, provider: &str, model: &str) -> bool {
        !self.exclude.iter().any(|t| t.matches(provider, model))
    }

    /// The position of the first preference naming `provider`'s `model` (lower goes first).
    pub fn preference(&self, provider: &str, model: &str) -> Option<usize> {
        self.prefer.iter().position(|t| t.matches(provider, model))
    }

    /// Whether every required capability is met by `caps`.
    pub fn capable(&self, caps: &Caps) -> bool {
        self.require.iter().all(|c| c.met_by(caps))
    }
}

/// A rule that fired: its line and its source text (without comment, trimmed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fired {
    pub line: u32,
    pub rule: String,
}

impl Policy {
    /// How many rules the policy holds.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Each rule's line and source text (without comment, trimmed), in file order.
    pub fn rules(&self) -> impl Iterator<Item = (u32, &str)> {
        self.rules.iter().map(|r| (r.line, r.text.as_str()))
    }

    /// What this policy asks for `profile`: the rules whose condition holds, combined in file
    /// order (see the module doc).
    pub fn evaluate(&self, profile: &Profile) -> Effects {
        let mut e = Effects::default();
        for rule in &self.rules {
            if !rule.when.as_ref().is_none_or(|c| c.holds(profile)) {
                continue;
            }
            e.fired.push(Fired {
                line: rule.line,
                rule: rule.text.clone(),
            });
            for action in &rule.actions {
                match action {
                    Action::Prefer(ts) => add_all(&mut e.prefer, ts),
                    Action::Exclude(ts) => add_all(&mut e.exclude, ts),
                    Action::CapTemperature(t) => {
                        e.max_temperature = Some(e.max_temperature.map_or(*t, |m| m.min(*t)));
                    }
                    Action::Require(cs) => add_all(&mut e.require, cs),
                    Action::Mode(m) => e.mode = Some(*m),
                    Action::Cache(on) => e.cache = Some(*on),
                    Action::Hedge(on) => e.hedge = Some(*on),
                }
            }
        }
        e
    }
}

fn add_all<T: PartialEq + Clone>(to: &mut Vec<T>, items: &[T]) {
    for item in items {
        if !to.contains(item) {
            to.push(item.clone());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The compiled form.

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    line: u32,
    text: String,
    when: Option<Cond>,
    actions: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq)]
enum Action {
    Prefer(Vec<Target>),
    Exclude(Vec<Target>),
    CapTemperature(f64),
    Require(Vec<Capability>),
    Mode(Mode),
    Cache(bool),
    Hedge(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    /// The dimension's value (its slot, see [`Scale::slot`]) is one of the mask's bits.
    Is {
        scale: Scale,
        mask: u32,
    },
    Compare {
        dim: Number,
        op: Op,
        value: f64,
    },
    Among {
        dim: Number,
        values: Vec<f64>,
        negated: bool,
    },
}

impl Cond {
    fn holds(&self, p: &Profile) -> bool {
        match self {
            Cond::All(cs) => cs.iter().all(|c| c.holds(p)),
            Cond::Any(cs) => cs.iter().any(|c| c.holds(p)),
            Cond::Not(c) => !c.holds(p),
            Cond::Is { scale, mask } => mask & (1 << scale.slot(p)) != 0,
            Cond::Compare { dim, op, value } => dim.value(p).is_some_and(|x| op.holds(x, *value)),
            Cond::Among {
                dim,
                values,
                negated,
            } => dim
                .value(p)
                .is_some_and(|x| values.contains(&x) != *negated),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn holds(self, x: f64, y: f64) -> bool {
        match self {
            Op::Eq => x == y,
            Op::Ne => x != y,
            Op::Lt => x < y,
            Op::Le => x <= y,
            Op::Gt => x > y,
            Op::Ge => x >= y,
        }
    }

    fn ordering(self) -> bool {
        !matches!(self, Op::Eq | Op::Ne)
    }
}

/// A dimension with named values. Each value has a slot (its index in [`Scale::names`]); a
/// profile value without a name (a non-background call's chore, an unknown mode) takes the
/// slot after the last name, so `!=` matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Family,
    Background,
    Depth,
    Precision,
    Latency,
    Security,
    Output,
    Tier,
    Mode,
    Budget,
    ToolForced,
    Seed,
    Json,
}

const CHORES: [(Background, &str); 6] = [
    (Background::Title, "title"),
    (Background::Tags, "tags"),
    (Background::FollowUps, "follow_ups"),
    (Background::Autocomplete, "autocomplete"),
    (Background::QueryGeneration, "query_generation"),
    (Background::Other, "other"),
];
const LEVELS: [(Level, &str); 3] = [
    (Level::Low, "low"),
    (Level::Medium, "medium"),
    (Level::High, "high"),
];
const LATENCIES: [(Latency, &str); 3] = [
    (Latency::Interactive, "interactive"),
    (Latency::Standard, "standard"),
    (Latency::Background, "background"),
];
const SECURITIES: [(Security, &str); 3] = [
    (Security::Public, "public"),
    (Security::Pii, "pii"),
    (Security::Secrets, "secrets"),
];
const OUTPUTS: [(Output, &str); 4] = [
    (Output::FreeText, "free_text"),
    (Output::Json, "json"),
    (Output::JsonSchema, "json_schema"),
    (Output::Code, "code"),
];
const TIERS: [(Tier, &str); 2] = [(Tier::Free, "free"), (Tier::Paid, "paid")];
const MODES: [(&str, &str); 3] = [("auto", "auto"), ("free", "free"), ("paid", "paid")];
const BUDGETS: [(BudgetHealth, &str); 3] = [
    (BudgetHealth::Healthy, "healthy"),
    (BudgetHealth::Lean, "lean"),
    (BudgetHealth::Spent, "spent"),
];
const BOOLS: [(bool, &str); 2] = [(false, "false"), (true, "true")];

/// The slot of `v` in `table` (the slot after the last one when it is not listed).
fn slot<T: PartialEq>(table: &[(T, &str)], v: T) -> u32 {
    table
        .iter()
        .position(|(t, _)| *t == v)
        .unwrap_or(table.len()) as u32
}

fn names<T>(table: &[(T, &'static str)]) -> Vec<&'static str> {
    table.iter().map(|(_, n)| *n).collect()
}

impl Scale {
    /// The value names, in slot order (low to high on ordered scales).
    fn names(self) -> Vec<&'static str> {
        match self {
            Scale::Family => Family::ALL.iter().map(|f| f.as_str()).collect(),
            Scale::Background => names(&CHORES),
            Scale::Depth | Scale::Precision => names(&LEVELS),
            Scale::Latency => names(&LATENCIES),
            Scale::Security => names(&SECURITIES),
            Scale::Output => names(&OUTPUTS),
            Scale::Tier => names(&TIERS),
            Scale::Mode => names(&MODES),
            Scale::Budget => names(&BUDGETS),
            Scale::ToolForced | Scale::Seed | Scale::Json => names(&BOOLS),
        }
    }

    /// How the values are called in an error message.
    fn what(self) -> &'static str {
        match self {
            Scale::Family => "a family",
            Scale::Background => "a background chore",
            Scale::Depth | Scale::Precision => "a level",
            Scale::Latency => "a latency",
            Scale::Security => "a security level",
            Scale::Output => "an output",
            Scale::Tier => "a tier",
            Scale::Mode => "a mode",
            Scale::Budget => "a budget health",
            Scale::ToolForced | Scale::Seed | Scale::Json => "a boolean",
        }
    }

    fn ordered(self) -> bool {
        matches!(self, Scale::Depth | Scale::Precision | Scale::Security)
    }

    /// What the bare name means, for the dimensions that can stand alone.
    fn bare(self) -> Option<Cond> {
        match self {
            Scale::Background => Some(Cond::Is {
                scale: Scale::Family,
                mask: 1 << Scale::family_slot(Family::Background),
            }),
            Scale::ToolForced | Scale::Seed | Scale::Json => Some(Cond::Is {
                scale: self,
                mask: 1 << slot(&BOOLS, true),
            }),
            _ => None,
        }
    }

    fn family_slot(f: Family) -> u32 {
        Family::ALL
            .iter()
            .position(|g| *g == f)
            .unwrap_or(Family::ALL.len()) as u32
    }

    /// Every slot, the unnamed one included.
    fn all_slots(self) -> u32 {
        (1 << (self.names().len() + 1)) - 1
    }

    /// The slot of `p`'s value on this dimension.
    fn slot(self, p: &Profile) -> u32 {
        match self {
            Scale::Family => Scale::family_slot(p.family.value),
            Scale::Background => match p.background {
                Some(b) => slot(&CHORES, b),
                None => CHORES.len() as u32,
            },
            Scale::Depth => slot(&LEVELS, p.depth.value),
            Scale::Precision => slot(&LEVELS, p.precision.value),
            Scale::Latency => slot(&LATENCIES, p.latency.value),
            Scale::Security => slot(&SECURITIES, p.security.value),
            Scale::Output => slot(&OUTPUTS, p.output.value),
            Scale::Tier => slot(&TIERS, p.tier.value),
            Scale::Mode => slot(&MODES, p.economic.value.mode),
            Scale::Budget => slot(&BUDGETS, p.economic.value.budget),
            Scale::ToolForced => slot(&BOOLS, p.tools.value.forced),
            Scale::Seed => slot(&BOOLS, p.determinism.value.seed),
            Scale::Json => slot(&BOOLS, p.determinism.value.json),
        }
    }
}

/// A numeric dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    Tokens,
    Turns,
    Documents,
    CodeBlocks,
    Images,
    Tools,
    Temperature,
}

impl Number {
    fn value(self, p: &Profile) -> Option<f64> {
        let c = &p.context.value;
        Some(f64::from(match self {
            Number::Tokens => c.tokens,
            Number::Turns => c.turns,
            Number::Documents => c.documents,
            Number::CodeBlocks => c.code_blocks,
            Number::Images => c.images,
            Number::Tools => p.tools.value.defined,
            Number::Temperature => return p.determinism.value.temperature,
        }))
    }
}

enum Dimension {
    Scale(Scale),
    Number(Number),
}

const DIMENSIONS: [(&str, Dimension); 20] = [
    ("family", Dimension::Scale(Scale::Family)),
    ("background", Dimension::Scale(Scale::Background)),
    ("depth", Dimension::Scale(Scale::Depth)),
    ("precision", Dimension::Scale(Scale::Precision)),
    ("latency", Dimension::Scale(Scale::Latency)),
    ("security", Dimension::Scale(Scale::Security)),
    ("output", Dimension::Scale(Scale::Output)),
    ("tier", Dimension::Scale(Scale::Tier)),
    ("mode", Dimension::Scale(Scale::Mode)),
    ("budget", Dimension::Scale(Scale::Budget)),
    ("tokens", Dimension::Number(Number::Tokens)),
    ("turns", Dimension::Number(Number::Turns)),
    ("documents", Dimension::Number(Number::Documents)),
    ("code_blocks", Dimension::Number(Number::CodeBlocks)),
    ("images", Dimension::Number(Number::Images)),
    ("tools", Dimension::Number(Number::Tools)),
    ("temperature", Dimension::Number(Number::Temperature)),
    ("tool_forced", Dimension::Scale(Scale::ToolForced)),
    ("seed", Dimension::Scale(Scale::Seed)),
    ("json", Dimension::Scale(Scale::Json)),
];

// ---------------------------------------------------------------------------------------------
// Parsing.

/// Parses a policy, reporting every error (one per line at most: parsing starts again at the
/// next line).
pub fn parse(text: &str) -> Result<Policy, Vec<PolicyError>> {
    if text.len() > MAX_POLICY_BYTES {
        let mut end = MAX_POLICY_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let head = &text[..end];
        let last = head.rfind('\n').map_or(0, |i| i + 1);
        return Err(vec![PolicyError {
            line: head.matches('\n').count() as u32 + 1,
            column: head[last..].chars().count() as u32 + 1,
            expected: format!("a policy of at most {MAX_POLICY_BYTES} bytes"),
            found: format!("{} bytes", text.len()),
        }]);
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    let mut seen = 0usize;
    for (i, raw) in text.split('\n').enumerate() {
        let mut line = Line {
            no: i as u32 + 1,
            text: raw.strip_suffix('\r').unwrap_or(raw),
            pos: 0,
        };
        if line.at_end() {
            continue;
        }
        seen += 1;
        if seen == MAX_RULES + 1 {
            let expected = format!("at most {MAX_RULES} rules (this is rule {seen})");
            let found = line.rest().trim_end().to_owned();
            errors.push(line.error_found(line.pos, expected, found));
        }
        match line.rule() {
            Ok(rule) => rules.push(rule),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(Policy { rules })
    } else {
        Err(errors)
    }
}

type Parsed<T> = Result<T, PolicyError>;

/// Characters that end a word and are tokens of their own.
const PUNCT: &[char] = &['(', ')', ',', ';', ':', '=', '!', '<', '>', '#'];

fn list(names: &[&str]) -> String {
    names.join(", ")
}

fn provider_ids() -> String {
    let mut ids: Vec<&str> = PROVIDERS.iter().map(|p| p.id).collect();
    if !ids.contains(&CUSTOM) {
        ids.push(CUSTOM);
    }
    list(&ids)
}

fn dimensions_expected() -> String {
    let names: Vec<&str> = DIMENSIONS.iter().map(|(n, _)| *n).collect();
    format!("a profile dimension ({})", list(&names))
}

const ACTIONS: &str = "prefer, exclude, cap, require, mode, cache, hedge";

/// One line being parsed; `pos` is a byte offset into `text`.
struct Line<'a> {
    no: u32,
    text: &'a str,
    pos: usize,
}

impl<'a> Line<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn skip_blanks(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// Whether only blanks or a comment are left.
    fn at_end(&mut self) -> bool {
        self.skip_blanks();
        self.rest().is_empty() || self.rest().starts_with('#')
    }

    /// An error at byte `pos`, with what is found there.
    fn error(&self, pos: usize, expected: String) -> PolicyError {
        let rest = &self.text[pos..];
        let found: String = if rest.starts_with('#') {
            String::new()
        } else if ["!=", "<=", ">="].iter().any(|p| rest.starts_with(p)) {
            rest[..2].to_owned()
        } else if rest.starts_with(PUNCT) {
            rest[..1].to_owned()
        } else {
            let end = rest
                .find(|c: char| c.is_whitespace() || PUNCT.contains(&c))
                .unwrap_or(rest.len());
            rest[..end].to_owned()
        };
        self.error_found(pos, expected, found)
    }

    fn error_found(&self, pos: usize, expected: String, found: String) -> PolicyError {
        const LONGEST: usize = 40;
        let found = match found.char_indices().nth(LONGEST) {
            Some((i, _)) => format!("{}…", &found[..i]),
            None => found,
        };
        PolicyError {
            line: self.no,
            column: self.text[..pos].chars().count() as u32 + 1,
            expected,
            found,
        }
    }

    /// The next word (`[A-Za-z_][A-Za-z0-9_]*`) and where it starts, without consuming it.
    fn peek_word(&mut self) -> Option<(usize, &'a str)> {
        self.skip_blanks();
        let rest = self.rest();
        if !rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return None;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        Some((self.pos, &rest[..end]))
    }

    /// Consumes the next word.
    fn word(&mut self, expected: impl FnOnce() -> String) -> Parsed<(usize, &'a str)> {
        match self.peek_word() {
            Some((at, w)) => {
                self.pos += w.len();
                Ok((at, w))
            }
            None => Err(self.error(self.pos, expected())),
        }
    }

    /// Consumes the keyword `kw` when it comes next.
    fn eat_word(&mut self, kw: &str) -> bool {
        match self.peek_word() {
            Some((_, w)) if w.eq_ignore_ascii_case(kw) => {
                self.pos += w.len();
                true
            }
            _ => false,
        }
    }

    /// Consumes `p` when it comes next.
    fn eat(&mut self, p: &str) -> bool {
        self.skip_blanks();
        if self.rest().starts_with(p) {
            self.pos += p.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, p: &str, expected: &str) -> Parsed<()> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(self.error(self.pos, expected.to_owned()))
        }
    }

    /// One of `names` (case-insensitive): its index.
    fn name(&mut self, names: &[&str], what: &str) -> Parsed<usize> {
        let expected = || format!("{what} ({})", list(names));
        let (at, w) = self.word(expected)?;
        names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(w))
            .ok_or_else(|| self.error(at, expected()))
    }

    /// `digits [ "." digits ]`, and where it starts.
    fn number(&mut self, expected: &str) -> Parsed<(usize, f64)> {
        self.skip_blanks();
        let at = self.pos;
        let rest = self.rest();
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let mut end = digits(rest);
        if end > 0 && rest[end..].starts_with('.') {
            let fraction = digits(&rest[end + 1..]);
            if fraction > 0 {
                end += 1 + fraction;
            }
        }
        let followed = rest[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
        match rest[..end].parse::<f64>() {
            Ok(n) if end > 0 && !followed => {
                self.pos += end;
                Ok((at, n))
            }
            _ => Err(self.error(at, expected.to_owned())),
        }
    }

    // --- rules ---

    fn rule(&mut self) -> Parsed<Rule> {
        let start = self.pos;
        let when = if self.eat_word("when") {
            let c = self.condition(0)?;
            self.expect(":", "`:`, `and` or `or`")?;
            Some(c)
        } else {
            None
        };
        let first = if when.is_none() {
            format!("`when` or an action ({ACTIONS})")
        } else {
            format!("an action ({ACTIONS})")
        };
        let mut actions = vec![self.action(first)?];
        while self.eat(";") {
            actions.push(self.action(format!("an action ({ACTIONS})"))?);
        }
        if !self.at_end() {
            let expected = match actions.last() {
                Some(Action::Prefer(_) | Action::Exclude(_) | Action::Require(_)) => {
                    "`,`, `;` or end of line"
                }
                _ => "`;` or end of line",
            };
            return Err(self.error(self.pos, expected.to_owned()));
        }
        Ok(Rule {
            line: self.no,
            text: self.text[start..self.pos].trim_end().to_owned(),
            when,
            actions,
        })
    }

    fn action(&mut self, expected: String) -> Parsed<Action> {
        let (at, w) = self.word(|| expected.clone())?;
        Ok(match w.to_ascii_lowercase().as_str() {
            "prefer" => Action::Prefer(self.targets()?),
            "exclude" => Action::Exclude(self.targets()?),
            "cap" => {
                if !self.eat_word("temperature") {
                    return Err(self.error(self.pos, "`temperature`".to_owned()));
                }
                let range = "a temperature from 0 to 2";
                let (at, t) = self.number(range)?;
                if !(0.0..=2.0).contains(&t) {
                    return Err(self.error(at, range.to_owned()));
                }
                Action::CapTemperature(t)
            }
            "require" => {
                let names: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
                let mut caps = vec![Capability::ALL[self.name(&names, "a capability")?]];
                while self.eat(",") {
                    caps.push(Capability::ALL[self.name(&names, "a capability")?]);
                }
                Action::Require(caps)
            }
            "mode" => {
                const ALL: [Mode; 3] = [Mode::Auto, Mode::Free, Mode::Paid];
                Action::Mode(ALL[self.name(&["auto", "free", "paid"], "a mode")?])
            }
            "cache" => Action::Cache(self.name(&["off", "on"], "`on` or `off`")? == 1),
            "hedge" => Action::Hedge(self.name(&["off", "on"], "`on` or `off`")? == 1),
            _ => return Err(self.error(at, expected)),
        })
    }

    fn targets(&mut self) -> Parsed<Vec<Target>> {
        let mut targets = vec![self.target()?];
        while self.eat(",") {
            targets.push(self.target()?);
        }
        Ok(targets)
    }

    /// `provider [ "/" model ]`: everything up to a blank, `,`, `;` or `#`.
    fn target(&mut self) -> Parsed<Target> {
        self.skip_blanks();
        let at = self.pos;
        let rest = self.rest();
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '#'))
            .unwrap_or(rest.len());
        let token = &rest[..end];
        let (provider, model) = match token.split_once('/') {
            Some((p, m)) => (p, Some(m)),
            None => (token, None),
        };
        let known = PROVIDERS
            .iter()
            .map(|p| p.id)
            .chain([CUSTOM])
            .find(|id| id.eq_ignore_ascii_case(provider));
        let Some(provider) = known else {
            let expected = format!("a provider id ({})", provider_ids());
            let found = if provider.is_empty() { token } else { provider };
            return Err(self.error_found(at, expected, found.to_owned()));
        };
        if model == Some("") {
            let after = at + provider.len() + 1;
            return Err(self.error(after, "a model id after `/`".to_owned()));
        }
        self.pos += end;
        Ok(Target {
            provider: provider.to_owned(),
            model: model.map(str::to_owned),
        })
    }

    // --- conditions ---

    fn condition(&mut self, depth: usize) -> Parsed<Cond> {
        let mut any = vec![self.conjunction(depth)?];
        while self.eat_word("or") {
            any.push(self.conjunction(depth)?);
        }
        Ok(if any.len() == 1 {
            any.remove(0)
        } else {
            Cond::Any(any)
        })
    }

    fn conjunction(&mut self, depth: usize) -> Parsed<Cond> {
        let mut all = vec![self.negation(depth)?];
        while self.eat_word("and") {
            all.push(self.negation(depth)?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Cond::All(all)
        })
    }

    fn negation(&mut self, depth: usize) -> Parsed<Cond> {
        self.skip_blanks();
        let at = self.pos;
        let nested = self.rest().starts_with('(')
            || self
                .peek_word()
                .is_some_and(|(_, w)| w.eq_ignore_ascii_case("not"));
        if nested && depth >= MAX_NESTING {
            return Err(self.error(
                at,
                format!("at most {MAX_NESTING} nested `(` and `not` in a condition"),
            ));
        }
        if self.eat_word("not") {
            return Ok(Cond::Not(Box::new(self.negation(depth + 1)?)));
        }
        if self.eat("(") {
            let c = self.condition(depth + 1)?;
            self.expect(")", "`)`, `and` or `or`")?;
            return Ok(c);
        }
        self.test()
    }

    fn test(&mut self) -> Parsed<Cond> {
        let (at, w) = self.word(dimensions_expected)?;
        let Some((name, dim)) = DIMENSIONS.iter().find(|(n, _)| n.eq_ignore_ascii_case(w)) else {
            return Err(self.error(at, dimensions_expected()));
        };
        self.skip_blanks();
        let op_at = self.pos;
        let op = self.operator();
        match dim {
            Dimension::Scale(scale) => {
                let scale = *scale;
                let Some(op) = op else {
                    return match scale.bare() {
                        Some(c) => Ok(c),
                        None => Err(self.error(op_at, operators_expected(scale.ordered()))),
                    };
                };
                if let Operator::Compare(o) = op {
                    if o.ordering() && !scale.ordered() {
                        return Err(
                            self.error(op_at, format!("`=`, `!=` or `in` ({name} is not ordered)"))
                        );
                    }
                }
                let names = scale.names();
                let what = scale.what();
                let mask = match op {
                    Operator::Compare(o) => {
                        let i = self.name(&names, what)? as u32;
                        let below = (1u32 << i) - 1;
                        let named = (1u32 << names.len()) - 1;
                        match o {
                            Op::Eq => 1 << i,
                            Op::Ne => scale.all_slots() & !(1 << i),
                            Op::Lt => below,
                            Op::Le => below | 1 << i,
                            Op::Gt => named & !(below | 1 << i),
                            Op::Ge => named & !below,
                        }
                    }
                    Operator::In(negated) => {
                        let mut mask = 0;
                        self.values(|l| {
                            mask |= 1u32 << l.name(&names, what)?;
                            Ok(())
                        })?;
                        if negated {
                            scale.all_slots() & !mask
                        } else {
                            mask
                        }
                    }
                };
                Ok(Cond::Is { scale, mask })
            }
            Dimension::Number(dim) => {
                let dim = *dim;
                match op {
                    None => Err(self.error(op_at, operators_expected(true))),
                    Some(Operator::Compare(op)) => {
                        let (_, value) = self.number("a number")?;
                        Ok(Cond::Compare { dim, op, value })
                    }
                    Some(Operator::In(negated)) => {
                        let mut values = Vec::new();
                        self.values(|l| {
                            values.push(l.number("a number")?.1);
                            Ok(())
                        })?;
                        Ok(Cond::Among {
                            dim,
                            values,
                            negated,
                        })
                    }
                }
            }
        }
    }

    /// `"(" value { "," value } ")"`, each value read by `value`.
    fn values(&mut self, mut value: impl FnMut(&mut Self) -> Parsed<()>) -> Parsed<()> {
        self.expect("(", "`(`")?;
        value(self)?;
        while self.eat(",") {
            value(self)?;
        }
        self.expect(")", "`,` or `)`")
    }

    /// A comparison operator, `in` or `not in`; nothing consumed when none comes next.
    fn operator(&mut self) -> Option<Operator> {
        for (p, op) in [
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("=", Op::Eq),
            ("<", Op::Lt),
            (">", Op::Gt),
        ] {
            if self.eat(p) {
                return Some(Operator::Compare(op));
            }
        }
        if self.eat_word("in") {
            return Some(Operator::In(false));
        }
        let before = self.pos;
        if self.eat_word("not") {
            if self.eat_word("in") {
                return Some(Operator::In(true));
            }
            self.pos = before;
        }
        None
    }
}

enum Operator {
    Compare(Op),
    /// `in`, or `not in` when true.
    In(bool),
}

fn operators_expected(ordered: bool) -> String {
    if ordered {
        "an operator (`=`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `not in`)".to_owned()
    } else {
        "an operator (`=`, `!=`, `in`, `not in`)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Context, Determinism, Dim, Economic, Tools};

    const EXAMPLE: &str = "\
# every tenant request
exclude nvidia, openrouter/meta-llama/llama-3.3-70b-instruct:free
prefer groq, gemini
cap temperature 0.7
when family = code and depth >= medium: prefer anthropic/claude-sonnet-4-5, openai
when family in (math, reasoning): mode paid
when background: mode free; cache on
when security >= pii: exclude openrouter, nvidia   # no free tier that trains on prompts
when output = json_schema: require json_schema
when family = creative: cache off
when depth = high and not (latency = background): hedge on
when tokens > 30000: prefer gemini
";

    fn dim<T>(value: T) -> Dim<T> {
        Dim::new(value, Vec::new())
    }

    /// A short interactive chat: the neutral profile every test changes.
    fn chat() -> Profile {
        Profile {
            family: dim(Family::Chat),
            background: None,
            depth: dim(Level::Low),
            precision: dim(Level::Low),
            latency: dim(Latency::Interactive),
            context: dim(Context {
                tokens: 120,
                turns: 1,
                documents: 0,
                code_blocks: 0,
                images: 0,
            }),
            tools: dim(Tools {
                defined: 0,
                forced: false,
                in_flight: false,
            }),
            determinism: dim(Determinism {
                temperature: None,
                seed: false,
                json: false,
            }),
            security: dim(Security::Public),
            output: dim(Output::FreeText),
            economic: dim(Economic::default()),
            tier: dim(Tier::Free),
        }
    }

    fn with(f: impl FnOnce(&mut Profile)) -> Profile {
        let mut p = chat();
        f(&mut p);
        p
    }

    fn target(provider: &str, model: Option<&str>) -> Target {
        Target {
            provider: provider.to_owned(),
            model: model.map(str::to_owned),
        }
    }

    fn ok(text: &str) -> Policy {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    /// The one error `text` has.
    fn err(text: &str) -> PolicyError {
        let mut errors = parse(text).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.remove(0)
    }

    /// Whether `condition` holds for `profile`.
    fn holds(condition: &str, profile: &Profile) -> bool {
        let policy = ok(&format!("when {condition}: hedge on"));
        policy.evaluate(profile).hedge == Some(true)
    }

    #[test]
    fn the_example_parses_and_keeps_its_rules() {
        let p = ok(EXAMPLE);
        assert_eq!(p.len(), 11);
        let rules: Vec<_> = p.rules().collect();
        assert_eq!(
            rules[0],
            (
                2,
                "exclude nvidia, openrouter/meta-llama/llama-3.3-70b-instruct:free"
            )
        );
        // The comment is not part of the rule.
        assert_eq!(
            rules[6],
            (8, "when security >= pii: exclude openrouter, nvidia")
        );
        assert!(ok("").is_empty() && ok("# nothing\n\n   \n").is_empty());
    }

    #[test]
    fn unconditional_rules_always_fire() {
        let e = ok(EXAMPLE).evaluate(&chat());
        assert_eq!(
            e.fired.iter().map(|f| f.line).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(e.fired[2].rule, "cap temperature 0.7");
        assert_eq!(e.prefer, [target("groq", None), target("gemini", None)]);
        assert_eq!(
            e.exclude,
            [
                target("nvidia", None),
                target("openrouter", Some("meta-llama/llama-3.3-70b-instruct:free"))
            ]
        );
        assert_eq!(e.max_temperature, Some(0.7));
        assert_eq!((e.mode, e.cache, e.hedge), (None, None, None));
        assert!(e.require.is_empty());
    }

    #[test]
    fn conditional_rules_fire_on_their_profiles() {
        let p = ok(EXAMPLE);
        let code = p.evaluate(&with(|p| {
            p.family = dim(Family::Code);
            p.depth = dim(Level::Medium);
            p.context.value.tokens = 40_000;
        }));
        assert_eq!(
            code.prefer,
            [
                target("groq", None),
                target("gemini", None),
                target("anthropic", Some("claude-sonnet-4-5")),
                target("openai", None),
            ]
        );
        assert_eq!(
            code.fired.iter().map(|f| f.line).collect::<Vec<_>>(),
            [2, 3, 4, 5, 12]
        );

        let math = p.evaluate(&with(|p| p.family = dim(Family::Reasoning)));
        assert_eq!(math.mode, Some(Mode::Paid));

        let title = p.evaluate(&with(|p| {
            p.family = dim(Family::Background);
            p.background = Some(Background::Title);
            p.latency = dim(Latency::Background);
            p.depth = dim(Level::High);
        }));
        assert_eq!(
            (title.mode, title.cache, title.hedge),
            (Some(Mode::Free), Some(true), None)
        );

        let pii = p.evaluate(&with(|p| p.security = dim(Security::Secrets)));
        assert_eq!(
            pii.exclude,
            [
                target("nvidia", None),
                target("openrouter", Some("meta-llama/llama-3.3-70b-instruct:free")),
                target("openrouter", None),
            ]
        );
        let schema = p.evaluate(&with(|p| p.output = dim(Output::JsonSchema)));
        assert_eq!(schema.require, [Capability::JsonSchema]);
        let deep = p.evaluate(&with(|p| p.depth = dim(Level::High)));
        assert_eq!(deep.hedge, Some(true));
        let poem = p.evaluate(&with(|p| p.family = dim(Family::Creative)));
        assert_eq!(poem.cache, Some(false));
    }

    #[test]
    fn rules_combine_in_file_order() {
        let p = ok("\
prefer groq, gemini
cap temperature 1.2
mode paid; cache on; hedge on
when tokens > 10: prefer cerebras, groq/llama-3.1-8b-instant, gemini; cap temperature 0.5
when tokens > 10: mode free; cache off; require tools, vision
when tokens > 1000000: mode auto
cap temperature 0.9; require vision, reasoning; hedge off
exclude nvidia; exclude nvidia, mistral
");
        let e = p.evaluate(&chat());
        // First mention keeps its position; a model of a preferred provider is its own target.
        assert_eq!(
            e.prefer,
            [
                target("groq", None),
                target("gemini", None),
                target("cerebras", None),
                target("groq", Some("llama-3.1-8b-instant")),
            ]
        );
        assert_eq!(e.max_temperature, Some(0.5));
        assert_eq!(e.mode, Some(Mode::Free));
        assert_eq!((e.cache, e.hedge), (Some(false), Some(false)));
        assert_eq!(
            e.require,
            [Capability::Tools, Capability::Vision, Capability::Reasoning]
        );
        assert_eq!(e.exclude, [target("nvidia", None), target("mistral", None)]);
        assert_eq!(
            e.fired.iter().map(|f| f.line).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 7, 8]
        );
        assert_eq!(e.fired[3].rule, "when tokens > 10: prefer cerebras, groq/llama-3.1-8b-instant, gemini; cap temperature 0.5");

        // Nothing fires: no effect at all.
        let none =
            ok("when tokens > 10: prefer groq").evaluate(&with(|p| p.context.value.tokens = 10));
        assert_eq!(none, Effects::default());
    }

    #[test]
    fn enumerated_dimensions() {
        let p = chat();
        for (condition, expected) in [
            ("family = chat", true),
            ("family = code", false),
            ("family != code", true),
            ("family in (code, chat)", true),
            ("family not in (code, chat)", false),
            ("family in (tool_use)", false),
            ("latency = interactive", true),
            ("latency in (standard, background)", false),
            ("output = free_text", true),
            ("output != json", true),
            ("tier = free", true),
            ("tier = paid", false),
            ("mode = auto", true),
            ("mode in (free, paid)", false),
            ("budget = healthy", true),
            ("budget != healthy", false),
            ("security = public", true),
            ("background", false),
            ("background = title", false),
            // A call that is no chore is no title.
            ("background != title", true),
            ("background not in (title, tags)", true),
            ("tool_forced", false),
            ("tool_forced = false", true),
            ("seed", false),
            ("json != true", true),
        ] {
            assert_eq!(holds(condition, &p), expected, "{condition}");
        }
        let p = with(|p| {
            p.family = dim(Family::Background);
            p.background = Some(Background::FollowUps);
            p.latency = dim(Latency::Background);
            p.output = dim(Output::Json);
            p.tier = dim(Tier::Paid);
            p.economic = dim(Economic {
                mode: "paid",
                budget: BudgetHealth::Lean,
                policy_mode: None,
            });
            p.tools.value.forced = true;
            p.determinism.value.seed = true;
            p.determinism.value.json = true;
        });
        for (condition, expected) in [
            ("background", true),
            ("family = background", true),
            ("background = follow_ups", true),
            ("background in (title, follow_ups)", true),
            ("background != follow_ups", false),
            ("latency = background", true),
            ("output = json", true),
            ("tier = paid", true),
            ("mode = paid", true),
            ("budget = lean", true),
            ("budget in (lean, spent)", true),
            ("tool_forced", true),
            ("tool_forced = true", true),
            ("seed and json", true),
            ("json = false", false),
        ] {
            assert_eq!(holds(condition, &p), expected, "{condition}");
        }
        // An unnamed mode matches `!=` but no name.
        let odd = with(|p| p.economic.value.mode = "weird");
        assert!(holds("mode != auto", &odd) && !holds("mode in (auto, free, paid)", &odd));
    }

    #[test]
    fn ordered_scales() {
        let medium = with(|p| {
            p.depth = dim(Level::Medium);
            p.precision = dim(Level::High);
            p.security = dim(Security::Pii);
        });
        for (condition, expected) in [
            ("depth = medium", true),
            ("depth != medium", false),
            ("depth < medium", false),
            ("depth <= medium", true),
            ("depth > medium", false),
            ("depth >= medium", true),
            ("depth > low", true),
            ("depth < high", true),
            ("depth >= high", false),
            ("depth <= low", false),
            ("depth in (low, high)", false),
            ("precision > medium", true),
            ("precision >= high", true),
            ("precision < low", false),
            ("security >= pii", true),
            ("security > pii", false),
            ("security < secrets", true),
            ("security <= public", false),
        ] {
            assert_eq!(holds(condition, &medium), expected, "{condition}");
        }
    }

    #[test]
    fn numbers() {
        let p = with(|p| {
            p.context.value = Context {
                tokens: 30_000,
                turns: 4,
                documents: 2,
                code_blocks: 3,
                images: 1,
            };
            p.tools.value.defined = 5;
            p.determinism.value.temperature = Some(0.7);
        });
        for (condition, expected) in [
            ("tokens > 30000", false),
            ("tokens >= 30000", true),
            ("tokens = 30000", true),
            ("tokens != 30000", false),
            ("tokens < 30000.5", true),
            ("turns <= 4", true),
            ("documents in (1, 2)", true),
            ("code_blocks not in (3)", false),
            ("images > 0", true),
            ("tools = 5", true),
            ("temperature = 0.7", true),
            ("temperature > 0.5", true),
            ("temperature <= 0.5", false),
        ] {
            assert_eq!(holds(condition, &p), expected, "{condition}");
        }
        // No temperature: no comparison matches, negative ones included; `not (…)` does.
        let unset = chat();
        for condition in [
            "temperature < 1",
            "temperature >= 0",
            "temperature != 1",
            "temperature = 0",
            "temperature in (0, 1)",
            "temperature not in (0, 1)",
        ] {
            assert!(!holds(condition, &unset), "{condition}");
        }
        assert!(holds("not (temperature > 1)", &unset));
    }

    #[test]
    fn precedence() {
        let p = chat(); // family chat, depth low, tokens 120
                        // `and` binds tighter than `or`: true or (false and false).
        assert!(holds("family = chat or depth = high and tokens > 1000", &p));
        assert!(!holds(
            "(family = chat or depth = high) and tokens > 1000",
            &p
        ));
        // `not` binds tighter than `and`: (not false) and true.
        assert!(holds("not depth = high and family = chat", &p));
        assert!(!holds("not (depth = low and family = chat)", &p));
        assert!(holds("not not family = chat", &p));
        assert!(holds("family = code or family = math or family = chat", &p));
        assert!(!holds("family = chat and depth = low and tokens < 100", &p));
        assert!(holds("((family = chat))", &p));
        assert!(holds(
            "(family = code or depth = low) and not (tokens > 100 and tokens < 110)",
            &p
        ));
    }

    #[test]
    fn names_are_case_insensitive_but_models_are_not() {
        let p = ok(
            "WHEN Family = CHAT AND Depth >= LOW: Prefer GROQ/Llama-X, Custom; MODE Paid; Cache ON",
        );
        let e = p.evaluate(&chat());
        assert_eq!(
            e.prefer,
            [target("groq", Some("Llama-X")), target("custom", None)]
        );
        assert_eq!((e.mode, e.cache), (Some(Mode::Paid), Some(true)));
    }

    #[test]
    fn comments_blank_lines_crlf_and_bom() {
        let p = ok("\u{feff}# head\r\n\r\n  prefer groq   # fast\r\n\twhen seed:hedge on#x\r\n");
        let rules: Vec<_> = p.rules().collect();
        assert_eq!(rules, [(3, "prefer groq"), (4, "when seed:hedge on")]);
    }

    #[test]
    fn blanks_are_optional_between_tokens() {
        let p =
            ok("when tokens>1 and family in(code,chat)and not(seed):prefer groq,gemini;hedge on");
        let e = p.evaluate(&chat());
        assert_eq!(e.prefer, [target("groq", None), target("gemini", None)]);
        assert_eq!(e.hedge, Some(true));
    }

    #[test]
    fn targets_match_providers_and_models() {
        let any = target("groq", None);
        let one = target("openrouter", Some("qwen/qwen3-coder:free"));
        assert!(any.matches("groq", "llama-3.1-8b-instant") && !any.matches("gemini", "x"));
        assert!(one.matches("openrouter", "qwen/qwen3-coder:free"));
        assert!(
            !one.matches("openrouter", "qwen/qwen3-coder")
                && !one.matches("groq", "qwen/qwen3-coder:free")
        );
        assert_eq!(one.to_string(), "openrouter/qwen/qwen3-coder:free");
        assert_eq!(any.to_string(), "groq");
        let p = ok(
            "when tokens > 0: exclude openrouter/qwen/qwen3-coder:free; prefer groq, openrouter",
        );
        let e = p.evaluate(&chat());
        assert!(!e.allows("openrouter", "qwen/qwen3-coder:free"));
        assert!(e.allows("openrouter", "openai/gpt-oss-20b:free") && e.allows("gemini", "x"));
        assert_eq!(e.preference("openrouter", "a"), Some(1));
        assert_eq!(e.preference("gemini", "a"), None);
    }

    #[test]
    fn capabilities() {
        let caps = Caps {
            tools: true,
            json_schema: true,
            ..Caps::default()
        };
        let met: Vec<_> = Capability::ALL
            .into_iter()
            .filter(|c| c.met_by(&caps))
            .collect();
        assert_eq!(met, [Capability::Tools, Capability::JsonSchema]);
        let every = Caps {
            tools: true,
            json_mode: true,
            json_schema: true,
            vision: true,
            reasoning: true,
            prefill: false,
        };
        assert!(Capability::ALL.iter().all(|c| c.met_by(&every)));
        let e = ok("require tools, json_mode, json_schema, vision, reasoning").evaluate(&chat());
        assert_eq!(e.require, Capability::ALL);
        assert!(e.capable(&every) && !e.capable(&caps));
    }

    #[test]
    fn effects_serialize_for_the_audit() {
        let e = ok("prefer groq, openai/gpt-4o-mini; cap temperature 0.5; require json_mode\nmode paid; cache on")
            .evaluate(&chat());
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({
                "prefer": [{"provider": "groq"}, {"provider": "openai", "model": "gpt-4o-mini"}],
                "exclude": [],
                "max_temperature": 0.5,
                "require": ["json_mode"],
                "mode": "paid",
                "cache": true,
                "hedge": null,
                "fired": [
                    {"line": 1, "rule": "prefer groq, openai/gpt-4o-mini; cap temperature 0.5; require json_mode"},
                    {"line": 2, "rule": "mode paid; cache on"}
                ]
            })
        );
    }

    #[test]
    fn the_store_key() {
        assert_eq!(key("t0123456789"), "policy:v1:t0123456789");
    }

    #[test]
    fn errors_display_their_position_expectation_and_finding() {
        let e = PolicyError {
            line: 3,
            column: 14,
            expected: "a provider id".into(),
            found: "12".into(),
        };
        assert_eq!(
            e.to_string(),
            "line 3, column 14: expected a provider id, found \"12\""
        );
        let end = PolicyError {
            found: String::new(),
            ..e
        };
        assert_eq!(
            end.to_string(),
            "line 3, column 14: expected a provider id, found end of line"
        );
        assert_eq!(end.message(), "expected a provider id, found end of line");
    }

    /// `(column, expected, found)` of the one error in `text`, on line 1.
    fn at(text: &str) -> (u32, String, String) {
        let e = err(text);
        assert_eq!(e.line, 1, "{e}");
        (e.column, e.expected, e.found)
    }

    fn check(text: &str, column: u32, expected: &str, found: &str) {
        let (c, e, f) = at(text);
        assert_eq!(
            (c, e.as_str(), f.as_str()),
            (column, expected, found),
            "{text}"
        );
    }

    /// Like `check`, for an expectation that ends in a list: only its start is compared.
    fn check_start(text: &str, column: u32, expected: &str, found: &str) {
        let (c, e, f) = at(text);
        assert!(e.starts_with(expected), "{text}: {e}");
        assert_eq!((c, f.as_str()), (column, found), "{text}");
    }

    #[test]
    fn value_errors_list_what_is_expected() {
        let ids = format!("a provider id ({})", provider_ids());
        assert!(
            ids.contains("groq, gemini") && ids.ends_with(", custom)"),
            "{ids}"
        );
        check("prefer 12", 8, &ids, "12");
        check("exclude groq, nvidai", 15, &ids, "nvidai");
        check("prefer /llama", 8, &ids, "/llama");
        check("prefer groq/", 13, "a model id after `/`", "");
        check("prefer groq/, gemini", 13, "a model id after `/`", ",");
        check("prefer", 7, &ids, "");
        check_start(
            "when family = cod: mode paid",
            15,
            "a family (chat, code, math, extraction, summarisation, translation, creative, reasoning, classification, tool_use, background)",
            "cod",
        );
        check(
            "when depth >= huge: hedge on",
            15,
            "a level (low, medium, high)",
            "huge",
        );
        check(
            "when security = secret: hedge on",
            17,
            "a security level (public, pii, secrets)",
            "secret",
        );
        check(
            "when background = chores: hedge on",
            19,
            "a background chore (title, tags, follow_ups, autocomplete, query_generation, other)",
            "chores",
        );
        check(
            "when latency = slow: hedge on",
            16,
            "a latency (interactive, standard, background)",
            "slow",
        );
        check(
            "when output = xml: hedge on",
            15,
            "an output (free_text, json, json_schema, code)",
            "xml",
        );
        check(
            "when tier = gold: hedge on",
            13,
            "a tier (free, paid)",
            "gold",
        );
        check(
            "when mode = cheap: hedge on",
            13,
            "a mode (auto, free, paid)",
            "cheap",
        );
        check(
            "when budget = low: hedge on",
            15,
            "a budget health (healthy, lean, spent)",
            "low",
        );
        check(
            "when seed = yes: hedge on",
            13,
            "a boolean (false, true)",
            "yes",
        );
        check(
            "require telepathy",
            9,
            "a capability (tools, json_mode, json_schema, vision, reasoning)",
            "telepathy",
        );
        check(
            "require tools,",
            15,
            "a capability (tools, json_mode, json_schema, vision, reasoning)",
            "",
        );
        check("mode cheap", 6, "a mode (auto, free, paid)", "cheap");
        check("cache maybe", 7, "`on` or `off` (off, on)", "maybe");
        check("hedge", 6, "`on` or `off` (off, on)", "");
        check(
            "cap temperature 2.5",
            17,
            "a temperature from 0 to 2",
            "2.5",
        );
        check("cap temperature -1", 17, "a temperature from 0 to 2", "-1");
        check(
            "cap temperature 0.7.1",
            17,
            "a temperature from 0 to 2",
            "0.7.1",
        );
        check("cap temp 0.5", 5, "`temperature`", "temp");
        check("when tokens > many: hedge on", 15, "a number", "many");
        check("when tokens > 30k: hedge on", 15, "a number", "30k");
        check("when tokens in (1, x): hedge on", 20, "a number", "x");
    }

    #[test]
    fn syntax_errors_say_where_and_what() {
        let actions = "an action (prefer, exclude, cap, require, mode, cache, hedge)";
        check(
            "prefers groq",
            1,
            &format!("`when` or an action ({ACTIONS})"),
            "prefers",
        );
        check("12", 1, &format!("`when` or an action ({ACTIONS})"), "12");
        check("when tokens > 1: go", 18, actions, "go");
        check("when tokens > 1:", 17, actions, "");
        check("mode paid;", 11, actions, "");
        check("mode paid; # trailing", 12, actions, "");
        check(
            "prefer groq gemini",
            13,
            "`,`, `;` or end of line",
            "gemini",
        );
        check("mode paid extra", 11, "`;` or end of line", "extra");
        check(
            "when depth = high mode paid",
            19,
            "`:`, `and` or `or`",
            "mode",
        );
        check(
            "when depth = high, seed: hedge on",
            18,
            "`:`, `and` or `or`",
            ",",
        );
        check(
            "when (depth = high: hedge on",
            19,
            "`)`, `and` or `or`",
            ":",
        );
        check(
            "when depth = high): hedge on",
            18,
            "`:`, `and` or `or`",
            ")",
        );
        check("when tokens >", 14, "a number", "");
        check("when: prefer groq", 5, &dimensions_expected(), ":");
        check(
            "when colour = red: prefer groq",
            6,
            &dimensions_expected(),
            "colour",
        );
        check("when seed and: hedge on", 14, &dimensions_expected(), ":");
        check(
            "when family: hedge on",
            12,
            "an operator (`=`, `!=`, `in`, `not in`)",
            ":",
        );
        check(
            "when tokens 5: hedge on",
            13,
            "an operator (`=`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `not in`)",
            "5",
        );
        check(
            "when family < code: hedge on",
            13,
            "`=`, `!=` or `in` (family is not ordered)",
            "<",
        );
        check(
            "when latency >= standard: hedge on",
            14,
            "`=`, `!=` or `in` (latency is not ordered)",
            ">=",
        );
        check(
            "when seed > false: hedge on",
            11,
            "`=`, `!=` or `in` (seed is not ordered)",
            ">",
        );
        check("when family in code: hedge on", 16, "`(`", "code");
        check(
            "when family in (code chat): hedge on",
            22,
            "`,` or `)`",
            "chat",
        );
        check("when family in (): hedge on", 17, "a family (chat, code, math, extraction, summarisation, translation, creative, reasoning, classification, tool_use, background)", ")");
        check(
            "when seed not json: hedge on",
            11,
            "`:`, `and` or `or`",
            "not",
        );
        check("when family == code: hedge on", 14, "a family (chat, code, math, extraction, summarisation, translation, creative, reasoning, classification, tool_use, background)", "=");
    }

    #[test]
    fn columns_count_characters() {
        // "prefer custom/modèle; mode " is 27 characters and 28 bytes.
        check(
            "prefer custom/modèle; mode x",
            28,
            "a mode (auto, free, paid)",
            "x",
        );
        check(
            "\tprefer ünknown",
            9,
            &format!("a provider id ({})", provider_ids()),
            "ünknown",
        );
        // A long finding is cut.
        let long = format!("prefer {}", "x".repeat(60));
        let (_, _, found) = at(&long);
        assert_eq!(found, format!("{}…", "x".repeat(40)));
    }

    #[test]
    fn every_error_is_reported_one_per_line() {
        let text = "\
prefer groq
prefer 12
when family = code: mode paid
when depth >> high: hedge on
# fine
cache maybe; hedge maybe
when tokens > 1 and: prefer gemini
";
        let errors = parse(text).unwrap_err();
        let positions: Vec<_> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(positions, [(2, 8), (4, 13), (6, 7), (7, 20)]);
        assert_eq!(
            errors[0].to_string(),
            format!(
                "line 2, column 8: expected a provider id ({}), found \"12\"",
                provider_ids()
            )
        );
    }

    #[test]
    fn size_limit() {
        let line = "prefer groq # padding padding padding padding padding padding\n";
        let fits = line.repeat(MAX_POLICY_BYTES / line.len());
        let mut at_limit = fits.clone();
        at_limit.push_str(&"#".repeat(MAX_POLICY_BYTES - fits.len()));
        assert_eq!(at_limit.len(), MAX_POLICY_BYTES);
        // Too many rules, but it is the size that is checked here.
        let errors = parse(&at_limit).unwrap_err();
        assert!(
            errors
                .iter()
                .all(|e| e.expected.starts_with("at most 256 rules")),
            "{errors:?}"
        );

        let comments = "#".repeat(MAX_POLICY_BYTES);
        assert!(ok(&comments).is_empty());
        let over = format!("prefer groq\n{}é", "#".repeat(MAX_POLICY_BYTES - 13));
        assert_eq!(over.len(), MAX_POLICY_BYTES + 1);
        let e = err(&over);
        // The first character past the limit: `é`, which straddles it, on line 2.
        assert_eq!((e.line, e.column), (2, MAX_POLICY_BYTES as u32 - 13 + 1));
        assert_eq!(e.expected, "a policy of at most 65536 bytes");
        assert_eq!(e.found, "65537 bytes");
    }

    #[test]
    fn rule_limit() {
        let rules = "# header\n".to_owned() + &"when tokens > 1: prefer groq\n".repeat(MAX_RULES);
        assert_eq!(ok(&rules).len(), MAX_RULES);
        let over = rules + "\nhedge on # one too many\nprefer 12\nhedge on\n";
        let errors = parse(&over).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            (errors[0].line, errors[0].column),
            (MAX_RULES as u32 + 3, 1)
        );
        assert_eq!(errors[0].expected, "at most 256 rules (this is rule 257)");
        assert_eq!(errors[0].found, "hedge on # one too many");
        // Errors after the limit are still reported.
        assert_eq!(errors[1].line, MAX_RULES as u32 + 4);
    }

    #[test]
    fn nesting_limit() {
        let deep = |n: usize| {
            format!(
                "when {}family = chat{}: hedge on",
                "(".repeat(n),
                ")".repeat(n)
            )
        };
        assert!(holds(
            &deep(MAX_NESTING)["when ".len()..deep(MAX_NESTING).len() - ": hedge on".len()],
            &chat()
        ));
        check(
            &deep(MAX_NESTING + 1),
            6 + MAX_NESTING as u32,
            "at most 32 nested `(` and `not` in a condition",
            "(",
        );
        let nots = format!("when {}seed: hedge on", "not ".repeat(MAX_NESTING + 1));
        check(
            &nots,
            6 + 4 * MAX_NESTING as u32,
            "at most 32 nested `(` and `not` in a condition",
            "not",
        );
        // Tens of thousands of `(` stop at the limit instead of exhausting the stack.
        let huge = format!("when {}", "(".repeat(60_000));
        assert_eq!(err(&huge).column, 6 + MAX_NESTING as u32);
    }

    #[test]
    fn evaluation_takes_microseconds() {
        let p = ok(EXAMPLE);
        let profile = with(|p| {
            p.family = dim(Family::Code);
            p.depth = dim(Level::High);
            p.security = dim(Security::Pii);
        });
        let runs = 2_000;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            std::hint::black_box(p.evaluate(std::hint::black_box(&profile)));
        }
        let each = start.elapsed() / runs;
        // Generous enough for an unoptimised build on a loaded machine.
        assert!(each < std::time::Duration::from_micros(200), "{each:?}");
    }
}
