//! The task profiler: ten dimensions read from a chat request without calling any model, each
//! with the features that set it, so the router can choose a tier and the audit can say why.
//!
//! Nothing is built at run time. Under Spin every request runs in a fresh wasm instance, so a
//! table built lazily (a `OnceLock`, an automaton) would be rebuilt on every request; the
//! lexicon's index (`PATTERNS`, `INDEX`) is instead computed by the compiler (`const`
//! evaluation of `LEXICON`) and lands in the binary's read-only data, ready on the first call.
//! Keep it so: no `OnceLock`, `LazyLock` or `thread_local!` tables in this module.

use crate::catalog::Tier;
use crate::wire::openai::ChatRequest;
use serde::Serialize;

/// One dimension's value and the features that set it (for the audit).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dim<T> {
    pub value: T,
    pub reasons: Vec<String>,
}

impl<T> Dim<T> {
    pub fn new(value: T, reasons: Vec<String>) -> Self {
        Self { value, reasons }
    }
}

/// What kind of work the request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Chat,
    Code,
    Math,
    Extraction,
    Summarisation,
    Translation,
    Creative,
    Reasoning,
    Classification,
    ToolUse,
    /// A client's own housekeeping (title, tags, follow-ups, autocomplete, search queries).
    Background,
}

impl Family {
    pub const ALL: [Family; 11] = [
        Family::Chat,
        Family::Code,
        Family::Math,
        Family::Extraction,
        Family::Summarisation,
        Family::Translation,
        Family::Creative,
        Family::Reasoning,
        Family::Classification,
        Family::ToolUse,
        Family::Background,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Chat => "chat",
            Family::Code => "code",
            Family::Math => "math",
            Family::Extraction => "extraction",
            Family::Summarisation => "summarisation",
            Family::Translation => "translation",
            Family::Creative => "creative",
            Family::Reasoning => "reasoning",
            Family::Classification => "classification",
            Family::ToolUse => "tool_use",
            Family::Background => "background",
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// Which housekeeping call a background request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    Title,
    Tags,
    FollowUps,
    Autocomplete,
    QueryGeneration,
    /// Another client-generated chore (emoji, memory, summary of a chat for a sidebar…).
    Other,
}

/// A coarse three-step scale (depth, precision need).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Low,
    Medium,
    High,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
        }
    }
}

/// How soon the answer is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Latency {
    /// A person is waiting for tokens (streaming chat, autocomplete).
    Interactive,
    /// A program is waiting for the whole answer.
    Standard,
    /// Nobody waits (housekeeping, batch).
    Background,
}

/// The shape of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Context {
    /// Estimated prompt tokens.
    pub tokens: u32,
    /// Messages of the user and assistant roles.
    pub turns: u32,
    /// Pasted documents (long non-code blocks of text).
    pub documents: u32,
    /// Fenced or indented code blocks.
    pub code_blocks: u32,
    /// Image parts.
    pub images: u32,
}

/// What the request needs from tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tools {
    /// Tool definitions sent.
    pub defined: u32,
    /// `tool_choice` forces a call (`required` or a named function).
    pub forced: bool,
    /// The conversation already carries tool calls or tool results.
    pub in_flight: bool,
}

/// How reproducible the answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Determinism {
    pub temperature: Option<f64>,
    pub seed: bool,
    /// `response_format` asks for JSON.
    pub json: bool,
}

/// How sensitive the prompt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    Public,
    /// Personal data markers (e-mail addresses, phone numbers, IBANs, card-like numbers…).
    Pii,
    /// Credentials (API keys, private keys, passwords, tokens).
    Secrets,
}

/// What the answer must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    FreeText,
    Json,
    JsonSchema,
    Code,
}

/// Budget health as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetHealth {
    /// No budget, or far from its limit.
    Healthy,
    /// Below `budget_lean_free_at` or predicted to run out before its reset.
    Lean,
    /// A budget is spent: paid candidates are out.
    Spent,
}

/// The inputs the profiler cannot read from the body (given by the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Economic {
    /// `auto`, `free` or `paid` (header or virtual model).
    pub mode: &'static str,
    pub budget: BudgetHealth,
    /// A tenant policy forced a mode for this request.
    pub policy_mode: Option<&'static str>,
}

impl Default for Economic {
    fn default() -> Self {
        Self {
            mode: "auto",
            budget: BudgetHealth::Healthy,
            policy_mode: None,
        }
    }
}

/// The ten dimensions, then the tier they call for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub family: Dim<Family>,
    /// Set when `family` is `background`: which chore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<Background>,
    pub depth: Dim<Level>,
    pub precision: Dim<Level>,
    pub latency: Dim<Latency>,
    pub context: Dim<Context>,
    pub tools: Dim<Tools>,
    pub determinism: Dim<Determinism>,
    pub security: Dim<Security>,
    pub output: Dim<Output>,
    pub economic: Dim<Economic>,
    /// The lowest tier that serves this request well: `paid` when a free model would likely
    /// under-serve it.
    pub tier: Dim<Tier>,
}

impl Profile {
    /// Profiles `request`; `economic` comes from the gateway (mode, budgets, policy).
    ///
    /// One pass over each message's text: the lexicons (ASCII case insensitive, looked up at
    /// word starts in a table the compiler built) over the part of it the caps allow
    /// ([`INSTRUCTION`], [`MATERIAL_HEAD`]…), and a line scan over all of it (code fences,
    /// code-like lines, stack frames, lists, questions, CJK script). Cost is linear in the body
    /// and bounded per message for lexicons; nothing is initialised on the first call.
    pub fn of(request: &ChatRequest, economic: Economic) -> Profile {
        Features::read(request.body(), request.stream).profile(economic)
    }

    /// Whether this is a client's housekeeping call (low priority, cheapest free model).
    pub fn is_background(&self) -> bool {
        self.family.value == Family::Background
    }
}

use serde_json::{Map, Value};

/// The first and last bytes of the current turn read as its instruction: all of them go
/// through the lexicons.
pub const INSTRUCTION: usize = 600;
/// Between them (the turn's material: a pasted document, code), the lexicons read at most
/// this many bytes from the start and [`MATERIAL_TAIL`] from the end…
pub const MATERIAL_HEAD: usize = 8 * 1024;
pub const MATERIAL_TAIL: usize = 2 * 1024;
/// …of a system prompt, these…
pub const SYSTEM_HEAD: usize = 6 * 1024;
pub const SYSTEM_TAIL: usize = 2 * 1024;
/// …and of an earlier user turn or a tool result, these. The model's own earlier answers are
/// not read by the lexicons at all (they weigh nothing in the decisions and secrets in them
/// are echoes of the user's). The line scan and the token estimate read every byte.
pub const HISTORY_HEAD: usize = 1024;
pub const HISTORY_TAIL: usize = 512;

/// What a lexicon pattern is evidence of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Cue {
    Code,
    CodeHard,
    CodeWrite,
    Math,
    MathHard,
    Extract,
    Summarise,
    Translate,
    Language,
    Creative,
    Reason,
    ReasonHard,
    Classify,
    Precise,
    Action,
    Agentic,
    /// Sequencing words: a multi-part ask.
    Step,
    // Background templates.
    TaskHeader,
    ChatHistory,
    KeyTitle,
    KeyTags,
    KeyFollowUps,
    KeyQueries,
    KeyText,
    KeyPrompt,
    TypeTag,
    Fim,
    HoleFill,
    TitleAsk,
    EmojiAsk,
    Memory,
    ToolSelect,
    JsonAsk,
    // Structure and security.
    Trace,
    Latex,
    DocMarker,
    Secret,
    SecretKv,
    PiiWord,
    /// A code fence: prose cues inside fenced code do not count.
    Fence,
}

impl Cue {
    /// Cues about what is asked, which code inside a fence is not evidence of.
    fn is_prose(self) -> bool {
        use Cue::*;
        matches!(
            self,
            CodeWrite
                | Math
                | MathHard
                | Extract
                | Summarise
                | Translate
                | Language
                | Creative
                | Reason
                | ReasonHard
                | Classify
                | Precise
                | Action
                | Agentic
                | Step
                | TitleAsk
                | EmojiAsk
                | PiiWord
        )
    }
}

const CUES: usize = Cue::Fence as usize + 1;

/// The lexicons. A trailing `*` makes a stem (any continuation); otherwise a pattern that
/// starts or ends with an ASCII letter or digit must sit on a word boundary there.
/// Lower case: matching is ASCII case-insensitive (non-ASCII capitals are listed apart).
#[rustfmt::skip]
const LEXICON: &[(&str, Cue)] = {
    use Cue::*;
    &[
    // Code, in the languages' own words and the programmers'.
    ("code", Code), ("function", Code), ("method", Code), ("class", Code), ("compile*", Code),
    ("compiler", Code), ("bug", Code), ("debug*", Code), ("stack trace", Code), ("exception", Code),
    ("unit test*", Code), ("regex", Code), ("sql", Code), ("python", Code), ("rust", Code),
    ("javascript", Code), ("typescript", Code), ("java", Code), ("c++", Code), ("golang", Code),
    ("kotlin", Code), ("swift", Code), ("bash", Code), ("shell script", Code), ("dockerfile", Code),
    ("kubernetes", Code), ("terraform", Code), ("react", Code), ("django", Code), ("api", Code),
    ("endpoint", Code), ("script", Code), ("variable", Code), ("null pointer", Code), ("segfault", Code),
    ("git", Code), ("merge conflict", Code), ("pull request", Code), ("lint*", Code), ("borrow checker", Code),
    ("async", Code), ("npm", Code), ("cargo", Code), ("pip install", Code), ("stack overflow", Code),
    ("repo", Code), ("codebase", Code), ("type error", Code), ("runtime error", Code), ("crash*", Code),
    ("fonction", Code), ("erreur", Code), ("déboguer", Code), ("Funktion", Code), ("fehler", Code),
    ("programm*", Code), ("función", Code), ("código", Code), ("função", Code), ("funzione", Code),
    ("codice", Code), ("algorithm", Code), ("algorithme", Code), ("algoritmo", Code), ("Algorithmus", Code),
    ("query optimizer", Code), ("index", Code), ("schema migration", Code), ("cli", Code), ("yaml", Code),
    ("server", Code), ("database", Code), ("backend", Code), ("frontend", Code), ("deploy*", Code), ("protocol", Code),
    ("data model", Code), ("mobile app", Code), ("postgres*", Code), ("redis", Code), ("gateway", Code),
    // Hard code: large changes, design, concurrency, root causes.
    ("refactor*", CodeHard), ("architecture", CodeHard), ("system design", CodeHard), ("design a", CodeHard),
    ("scalab*", CodeHard), ("distributed", CodeHard), ("race condition", CodeHard), ("deadlock*", CodeHard),
    ("memory leak", CodeHard), ("concurren*", CodeHard), ("migrate", CodeHard), ("migration", CodeHard),
    ("microservice*", CodeHard), ("thread-safe", CodeHard), ("lock-free", CodeHard),
    ("undefined behavio*", CodeHard), ("root cause", CodeHard), ("performance regression", CodeHard),
    ("event sourcing", CodeHard),
    ("architektur", CodeHard), ("arquitectura", CodeHard), ("arquitetura", CodeHard), ("architettura", CodeHard),
    ("refactoris*", CodeHard), ("refaktor*", CodeHard), ("refactoriz*", CodeHard), ("intermittent*", CodeHard),
    ("heisenbug", CodeHard), ("only in production", CodeHard), ("flaky", CodeHard),
    ("crdt*", CodeHard), ("vector clock*", CodeHard), ("eventual consistency", CodeHard), ("consensus", CodeHard),
    ("raft", CodeHard), ("paxos", CodeHard), ("replication", CodeHard), ("failover", CodeHard), ("zero downtime", CodeHard),
    ("high availability", CodeHard), ("rate limiter", CodeHard), ("load balanc*", CodeHard), ("cache invalidation", CodeHard),
    ("idempoten*", CodeHard), ("exactly-once", CodeHard), ("backpressure", CodeHard), ("vulnerabilit*", CodeHard),
    ("security review", CodeHard), ("timing attack*", CodeHard), ("session fixation", CodeHard), ("sql injection", CodeHard),
    ("xss", CodeHard), ("csrf", CodeHard), ("privilege escalation", CodeHard), ("sharded", CodeHard), ("sharding", CodeHard),
    // Asking for code as the answer.
    ("write a function", CodeWrite), ("implement", CodeWrite), ("write code", CodeWrite), ("write a script", CodeWrite),
    ("fix", CodeWrite), ("only code", CodeWrite), ("code only", CodeWrite), ("only the code", CodeWrite),
    ("generate a", CodeWrite), ("write a class", CodeWrite), ("write a query", CodeWrite), ("write a sql", CodeWrite),
    ("add a test", CodeWrite), ("write tests", CodeWrite), ("écris une fonction", CodeWrite), ("corrige", CodeWrite),
    ("schreibe eine funktion", CodeWrite), ("escribe una función", CodeWrite), ("escreva uma função", CodeWrite),
    ("scrivi una funzione", CodeWrite), ("convert this", CodeWrite), ("port this", CodeWrite),
    // Mathematics.
    ("solve", Math), ("equation", Math), ("integral", Math), ("derivative", Math), ("probability", Math),
    ("calculate", Math), ("compute", Math), ("matrix", Math), ("eigen*", Math), ("polynomial", Math),
    ("how many", Math), ("percentage", Math), ("interest rate", Math), ("geometry", Math), ("triangle", Math),
    ("algebra", Math), ("calculus", Math), ("statistic*", Math), ("variance", Math), ("modulo", Math),
    ("prime", Math), ("factorial", Math), ("logarithm", Math), ("vector space", Math), ("expected value", Math),
    ("résoudre", Math), ("résous", Math), ("équation", Math), ("intégrale", Math), ("probabilité", Math),
    ("calcule", Math), ("Gleichung", Math), ("gleichung", Math), ("berechne", Math), ("wahrscheinlichkeit", Math),
    ("ecuación", Math), ("probabilidad", Math), ("calcula", Math), ("equação", Math), ("probabilidade", Math),
    ("equazione", Math), ("probabilità", Math), ("calcola", Math), ("^2", Math), ("x^", Math),
    ("average", Math), ("expected number", Math), ("without replacement", Math), ("how much", Math), ("square root", Math), ("divided by", Math), ("fraction", Math), ("ratio", Math),
    ("median", Math), ("per cent", Math), ("percent", Math), ("km/h", Math), ("speed", Math), ("convert", Math),
    ("raíz", Math), ("racine", Math), ("wurzel", Math), ("quanto fa", Math), ("cuánto es", Math), ("combien font", Math),
    ("area", Math), ("aire", Math), ("fläche", Math), ("volume", Math), ("rabatt", Math), ("discount", Math),
    // Proof-grade mathematics.
    ("prove", MathHard), ("proof", MathHard), ("lemma", MathHard), ("theorem", MathHard), ("rigorous*", MathHard),
    ("show that", MathHard), ("induction", MathHard), ("converge*", MathHard), ("démontre*", MathHard),
    ("preuve", MathHard), ("beweis*", MathHard), ("demuestra", MathHard), ("demostración", MathHard),
    ("demonstre", MathHard), ("demonstração", MathHard), ("dimostra*", MathHard), ("if and only if", MathHard),
    ("iff", MathHard), ("contradiction", MathHard), ("bijection", MathHard), ("homomorphism", MathHard),
    // Extraction.
    ("extract*", Extract), ("parse", Extract), ("pull out", Extract), ("named entit*", Extract),
    ("entities", Extract), ("key-value", Extract), ("fields", Extract), ("invoice", Extract), ("receipt", Extract),
    ("into json", Extract), ("as json", Extract), ("structured data", Extract), ("fill in the schema", Extract),
    ("extrai*", Extract), ("extrahier*", Extract), ("extrae", Extract), ("estrai*", Extract), ("list all", Extract),
    ("line items", Extract), ("dates and amounts", Extract),
    // Summarisation.
    ("summar*", Summarise), ("summaris*", Summarise), ("tl;dr", Summarise), ("tldr", Summarise),
    ("key points", Summarise), ("key takeaways", Summarise), ("condense", Summarise), ("recap", Summarise),
    ("in a nutshell", Summarise), ("gist", Summarise), ("résume*", Summarise), ("résumé", Summarise),
    ("zusammenfass*", Summarise), ("fasse", Summarise), ("fass", Summarise), ("resum*", Summarise), ("riassum*", Summarise), ("sintetiz*", Summarise),
    ("synthèse", Summarise), ("sintesi", Summarise), ("brief overview", Summarise), ("总结", Summarise),
    ("要約", Summarise), ("摘要", Summarise),
    // Translation.
    ("translat*", Translate), ("traduis", Translate), ("traduire", Translate), ("traduction", Translate),
    ("übersetz*", Translate), ("Übersetz*", Translate), ("traduce", Translate), ("traducir", Translate),
    ("traducción", Translate), ("traduza", Translate), ("traduzir", Translate), ("tradução", Translate),
    ("traduci", Translate), ("tradurre", Translate), ("traduzione", Translate), ("翻译", Translate),
    ("how do you say", Translate), ("how do i say", Translate), ("what's the word for", Translate), ("comment dit-on", Translate),
    ("wie sagt man", Translate), ("cómo se dice", Translate), ("como se diz", Translate), ("come si dice", Translate),
    ("翻譯", Translate), ("翻訳", Translate), ("번역", Translate), ("localize", Translate), ("localise", Translate),
    ("english", Language), ("french", Language), ("german", Language), ("spanish", Language),
    ("portuguese", Language), ("italian", Language), ("chinese", Language), ("japanese", Language),
    ("korean", Language), ("dutch", Language), ("russian", Language), ("arabic", Language),
    ("anglais", Language), ("français", Language), ("allemand", Language), ("espagnol", Language),
    ("englisch", Language), ("französisch", Language), ("deutsch", Language), ("spanisch", Language),
    ("inglés", Language), ("francés", Language), ("alemán", Language), ("español", Language),
    ("inglês", Language), ("francês", Language), ("alemão", Language), ("português", Language),
    ("inglese", Language), ("francese", Language), ("tedesco", Language), ("italiano", Language),
    ("中文", Language), ("日本語", Language), ("英语", Language), ("英語", Language), ("한국어", Language),
    // Creative writing.
    ("poem", Creative), ("story", Creative), ("haiku", Creative), ("lyrics", Creative), ("song", Creative),
    ("fiction", Creative), ("limerick", Creative), ("sonnet", Creative), ("slogan", Creative), ("tagline", Creative),
    ("joke", Creative), ("screenplay", Creative), ("novel", Creative), ("fairy tale", Creative), ("rap", Creative),
    ("short story", Creative), ("bedtime", Creative), ("verse", Creative), ("rhyme*", Creative), ("plot twist", Creative),
    ("character", Creative), ("poème", Creative), ("conte", Creative), ("histoire", Creative), ("gedicht", Creative),
    ("geschichte", Creative), ("märchen", Creative), ("poema", Creative), ("cuento", Creative), ("historia", Creative),
    ("história", Creative), ("poesia", Creative), ("racconto", Creative), ("storia", Creative), ("canción", Creative),
    ("brainstorm", Creative), ("catchy", Creative), ("toast", Creative), ("wedding speech", Creative),
    // Reasoning and analysis.
    ("step by step", Reason), ("reason*", Reason), ("trade-off*", Reason), ("tradeoff*", Reason),
    ("pros and cons", Reason), ("compare", Reason), ("strategy", Reason), ("puzzle", Reason), ("riddle", Reason),
    ("logic*", Reason), ("deduce", Reason), ("which option", Reason), ("should i", Reason), ("evaluate", Reason),
    ("analy*", Reason), ("implications", Reason), ("why does", Reason), ("why is", Reason), ("decide", Reason),
    ("pourquoi", Reason), ("compar*", Reason), ("warum", Reason), ("vergleich*", Reason), ("por qué", Reason),
    ("perché", Reason), ("por que", Reason), ("plan", Reason), ("argument", Reason), ("dilemma", Reason),
    ("pros", Reason), ("cons", Reason), ("is it better", Reason), ("better to", Reason), ("worth it", Reason),
    ("für und gegen", Reason), ("vor- und nachteile", Reason), ("avantages et inconvénients", Reason),
    ("ventajas y desventajas", Reason), ("vantagens e desvantagens", Reason), ("pro e contro", Reason),
    ("explain why", Reason), ("cause", Reason),
    // Hard reasoning: constraint problems, multi-step planning, rigorous analysis.
    ("constraint*", ReasonHard), ("optimal", ReasonHard), ("game theory", ReasonHard), ("counterfactual", ReasonHard),
    ("multi-step", ReasonHard), ("edge cases", ReasonHard), ("all possible", ReasonHard), ("exactly one", ReasonHard),
    ("no two", ReasonHard), ("logic grid", ReasonHard), ("knights and knaves", ReasonHard), ("minimi*", ReasonHard),
    ("maximi*", ReasonHard), ("worst case", ReasonHard), ("failure mode*", ReasonHard), ("second-order", ReasonHard),
    ("threat model", ReasonHard), ("each of the", ReasonHard), ("must satisfy", ReasonHard), ("derive", ReasonHard),
    ("contraint*", ReasonHard), ("Einschränkung*", ReasonHard), ("restricci*", ReasonHard), ("restriç*", ReasonHard),
    ("vincol*", ReasonHard), ("rigorously", ReasonHard), ("in depth", ReasonHard), ("in-depth", ReasonHard),
    // Demands of rigour: justify each step, prove it minimal.
    ("justify", ReasonHard), ("justifie*", ReasonHard), ("begründe*", ReasonHard), ("justifica*", ReasonHard),
    ("giustifica*", ReasonHard), ("each step", ReasonHard), ("every step", ReasonHard), ("derivation", ReasonHard),
    ("prouve*", ReasonHard), ("in der tiefe", ReasonHard), ("leite ab", ReasonHard), ("herleit*", ReasonHard),
    ("optimale", ReasonHard), ("minimale", ReasonHard), ("minimal", ReasonHard), ("en profondeur", ReasonHard),
    ("a fondo", ReasonHard), ("em profundidade", ReasonHard), ("in profondità", ReasonHard), ("assignments", ReasonHard),
    // Classification.
    ("classify", Classify), ("classif*", Classify), ("categori*", Classify), ("label", Classify),
    ("sentiment", Classify), ("which category", Classify), ("spam", Classify), ("positive or negative", Classify),
    ("one of:", Classify), ("intent", Classify), ("toxic*", Classify), ("triage", Classify), ("priority:", Classify),
    ("klassifizier*", Classify), ("clasifica*", Classify), ("sentimento", Classify), ("catégori*", Classify),
    ("kategorisier*", Classify), ("is this email", Classify), ("answer with only", Classify),
    // High-precision domains and wording.
    ("legal", Precise), ("contract", Precise), ("clause*", Precise), ("compliance", Precise), ("regulat*", Precise),
    ("gdpr", Precise), ("hipaa", Precise), ("medical", Precise), ("diagnos*", Precise), ("dosage", Precise),
    ("financial", Precise), ("audit*", Precise), ("tax", Precise), ("exact", Precise), ("exactly", Precise),
    ("precise*", Precise), ("accurate*", Precise), ("verbatim", Precise), ("liabilit*", Precise), ("indemn*", Precise),
    ("warrant*", Precise), ("covenant*", Precise), ("every", Precise), ("do not miss", Precise), ("inconsisten*", Precise),
    ("discrepanc*", Precise), ("contrat", Precise), ("juridique", Precise), ("médical", Precise), ("vertrag*", Precise),
    ("rechtlich*", Precise), ("contrato", Precise), ("jurídic*", Precise), ("contratto", Precise), ("legale", Precise),
    ("pharmac*", Precise), ("clinical", Precise), ("safety-critical", Precise), ("securities", Precise),
    ("précis*", Precise), ("exakt*", Precise), ("genau*", Precise), ("exacto*", Precise), ("exato*", Precise),
    ("preciso", Precise), ("esatto", Precise), ("haftung*", Precise), ("responsabilité", Precise), ("résiliation", Precise),
    ("kündigung*", Precise), ("obligation*", Precise), ("do not invent", Precise), ("clause-by-clause", Precise),
    // Actions a tool serves.
    ("search the web", Action), ("search for", Action), ("look up", Action), ("latest", Action), ("current", Action),
    ("today", Action), ("weather", Action), ("book a", Action), ("schedule a", Action), ("send an email", Action),
    ("send a message", Action), ("create a ticket", Action), ("open an issue", Action), ("check my", Action),
    ("fetch", Action), ("remind me", Action), ("add to my", Action), ("calendar", Action), ("stock price", Action),
    ("news", Action), ("find me", Action), ("call the", Action), ("use the tool", Action), ("run the", Action),
    ("météo", Action), ("wetter", Action), ("clima", Action), ("aujourd'hui", Action), ("heute", Action), ("hoy", Action),
    ("hoje", Action), ("oggi", Action),
    // Sequencing: an ask in several steps.
    ("then", Step), ("after that", Step), ("finally", Step), ("and next", Step), ("puis", Step), ("ensuite", Step),
    ("dann", Step), ("danach", Step), ("luego", Step), ("después", Step), ("depois", Step), ("quindi", Step), ("poi", Step),
    // Agent system prompts.
    ("you are an agent", Agentic), ("autonomous", Agentic), ("react", Agentic), ("thought:", Agentic),
    ("observation:", Agentic), ("tool calls", Agentic), ("call tools", Agentic), ("multi-step task", Agentic),
    ("until the task is complete", Agentic), ("plan and execute", Agentic),
    // OpenWebUI's task templates (backend/open_webui/config.py) and their JSON answers.
    ("### task:", TaskHeader), ("<chat_history>", ChatHistory), ("\"title\"", KeyTitle), ("\"tags\"", KeyTags),
    ("\"follow_ups\"", KeyFollowUps), ("\"queries\"", KeyQueries), ("{ \"text\"", KeyText), ("{\"text\"", KeyText),
    ("\"prompt\"", KeyPrompt), ("<type>", TypeTag), ("json format:", JsonAsk), ("in json format", JsonAsk),
    ("strictly return in json", JsonAsk), ("respond only in json", JsonAsk),
    // Fill-in-the-middle (Continue, code models) and hole-filler prompts.
    ("<fim_prefix>", Fim), ("<fim_suffix>", Fim), ("<fim_middle>", Fim), ("<|fim_prefix|>", Fim),
    ("<|fim_suffix|>", Fim), ("<|fim_middle|>", Fim), ("<｜fim▁begin｜>", Fim), ("<|fim▁begin|>", Fim),
    ("<｜fim▁hole｜>", Fim), ("<|fim▁hole|>", Fim), ("<|code_suffix|>", Fim), ("<|code_prefix|>", Fim),
    ("<pre>", Fim), ("<suf>", Fim), ("<mid>", Fim), ("{{fill_here}}", HoleFill), ("hole filler", HoleFill),
    ("[blank]", HoleFill), ("<completion>", HoleFill),
    // Title chores (Continue's ChatDescriber, older OpenWebUI).
    ("title for the chat", TitleAsk), ("title for this chat", TitleAsk), ("title for the conversation", TitleAsk),
    ("title for this conversation", TitleAsk), ("word title", TitleAsk), ("chat title", TitleAsk),
    ("conversation title", TitleAsk), ("as a header for the following", TitleAsk), ("titre pour cette conversation", TitleAsk),
    ("titel für diese", TitleAsk), ("título para esta conversación", TitleAsk), ("título para esta conversa", TitleAsk),
    ("facial expression", EmojiAsk),
    // Memory and summary chores of agent frameworks.
    ("progressively summarize", Memory), ("current summary:", Memory), ("new lines of conversation", Memory),
    ("new summary:", Memory), ("extend this summary", Memory), ("summary of the conversation above", Memory),
    ("personal information organizer", Memory), ("\"facts\"", Memory), ("memories:", Memory),
    ("available tools:", ToolSelect), ("\"functionname\"", ToolSelect), ("no tools match", ToolSelect),
    // Stack traces and compiler output.
    ("traceback (most recent call last)", Trace), ("panicked at", Trace), ("exception in thread", Trace),
    ("stack backtrace", Trace), ("error[e", Trace), ("uncaught", Trace), ("typeerror:", Trace),
    ("valueerror:", Trace), ("keyerror:", Trace), ("attributeerror:", Trace), ("nullpointerexception", Trace),
    ("segmentation fault", Trace), ("core dumped", Trace), ("goroutine ", Trace), ("fatal error:", Trace),
    ("\", line ", Trace), ("unhandled promise rejection", Trace), ("caused by:", Trace), ("at java.", Trace),
    ("indexerror:", Trace), ("importerror:", Trace), ("modulenotfounderror", Trace), ("error: ", Trace),
    // Mathematical notation.
    ("\\frac", Latex), ("\\int", Latex), ("\\sum", Latex), ("\\sqrt", Latex), ("\\begin{", Latex), ("$$", Latex),
    ("\\lim", Latex), ("\\mathbb", Latex), ("\\forall", Latex), ("\\infty", Latex), ("\\cdot", Latex),
    ("∫", Latex), ("∑", Latex), ("√", Latex), ("≤", Latex), ("≥", Latex), ("∀", Latex), ("∈", Latex), ("∞", Latex),
    // Pasted documents (RAG templates, explicit markers).
    ("<source", DocMarker), ("<document", DocMarker), ("<context>", DocMarker), ("--- begin", DocMarker),
    ("[document", DocMarker), ("\"\"\"", DocMarker),
    // Credentials: prefixes checked further in `secret_at`.
    ("sk-", Secret), ("ghp_", Secret), ("github_pat_", Secret), ("xoxb-", Secret), ("xoxp-", Secret),
    ("akia", Secret), ("aiza", Secret), ("-----begin", Secret), ("bearer ", Secret), ("eyj", Secret),
    ("password", SecretKv), ("passwd", SecretKv), ("api_key", SecretKv), ("apikey", SecretKv), ("api-key", SecretKv),
    ("secret_key", SecretKv), ("client_secret", SecretKv), ("access_token", SecretKv), ("auth_token", SecretKv),
    ("mot de passe", SecretKv), ("passwort", SecretKv), ("contraseña", SecretKv), ("senha", SecretKv),
    // Personal data words.
    ("social security number", PiiWord), ("ssn", PiiWord), ("date of birth", PiiWord), ("passport number", PiiWord),
    ("iban", PiiWord), ("medical record", PiiWord), ("geburtsdatum", PiiWord), ("date de naissance", PiiWord),
    ("fecha de nacimiento", PiiWord), ("data di nascita", PiiWord), ("codice fiscale", PiiWord), ("cpf", PiiWord),
    ("home address", PiiWord), ("numéro de sécurité sociale", PiiWord), ("patient name", PiiWord),
    ("```", Fence),
    ]
};

/// One lexicon pattern as the scan uses it: its bytes (a stem's `*` cut off), its cue, and
/// whether it needs a word boundary before / after it.
#[derive(Clone, Copy)]
struct Pattern {
    bytes: &'static [u8],
    cue: Cue,
    left: bool,
    right: bool,
}

const PATTERNS_N: usize = LEXICON.len();

/// The lexicon's patterns, computed by the compiler.
static PATTERNS: [Pattern; PATTERNS_N] = {
    let mut out = [Pattern {
        bytes: b"",
        cue: Cue::Fence,
        left: false,
        right: false,
    }; PATTERNS_N];
    let mut i = 0;
    while i < PATTERNS_N {
        let (text, cue) = LEXICON[i];
        let b = text.as_bytes();
        let stem = b[b.len() - 1] == b'*';
        let b = if stem { b.split_at(b.len() - 1).0 } else { b };
        assert!(b.len() >= 2, "a lexicon pattern has two bytes at least");
        out[i] = Pattern {
            bytes: b,
            cue,
            left: b[0].is_ascii_alphanumeric(),
            right: !stem && b[b.len() - 1].is_ascii_alphanumeric(),
        };
        i += 1;
    }
    out
};

/// ASCII capitals to lower case in eight bytes at once (other bytes unchanged).
#[inline(always)]
const fn fold8(x: u64) -> u64 {
    const LSB: u64 = 0x0101_0101_0101_0101;
    let low7 = x & (0x7F * LSB);
    let above_z = low7.wrapping_add((0x7F - b'Z') as u64 * LSB);
    let from_a = low7.wrapping_add((0x80 - b'A') as u64 * LSB);
    let upper = from_a & !above_z & !x & (0x80 * LSB);
    x | (upper >> 2)
}

/// The first eight bytes of `b` (zeros past its end), little-endian.
#[inline(always)]
const fn word8(b: &[u8]) -> u64 {
    match b.first_chunk::<8>() {
        Some(c) => u64::from_le_bytes(*c),
        None => {
            let mut x = 0;
            let mut k = 0;
            while k < b.len() {
                x |= (b[k] as u64) << (8 * k);
                k += 1;
            }
            x
        }
    }
}

/// The first eight bytes of `b` (zeros past its end), little-endian and case folded.
#[inline(always)]
const fn head_of(b: &[u8]) -> u64 {
    fold8(word8(b))
}

/// Buckets of the index (a power of two, about four times the patterns: most are empty).
const BUCKETS: usize = 2048;

/// The bucket of a folded head: a multiplicative hash of its first three bytes.
#[inline(always)]
const fn bucket(head: u64) -> usize {
    ((head as u32 & 0x00FF_FFFF).wrapping_mul(0x9E37_79B1) >> (32 - BUCKETS.trailing_zeros()))
        as usize
}

/// A pattern as the index holds it: its first eight bytes (case folded, little-endian, zeros
/// past its end), so most tries are one compare, its length and its number.
#[derive(Clone, Copy)]
struct Entry {
    head: u64,
    len: u16,
    pattern: u16,
}

impl Entry {
    /// The mask of the bytes of `head` that are the pattern's.
    #[inline(always)]
    const fn mask(self) -> u64 {
        if self.len >= 8 {
            u64::MAX
        } else {
            (1 << (8 * self.len)) - 1
        }
    }
}

/// The lexicon's index, computed by the compiler: the patterns of three bytes or more by the
/// bucket of their first three, the two-byte ones after them, and the bytes that start a
/// pattern with no word boundary before it.
struct Index {
    /// Bucket `k` is `entries[start[k]..start[k + 1]]`.
    start: [u16; BUCKETS + 1],
    /// By bucket, in lexicon order within one; the two-byte patterns last.
    entries: [Entry; PATTERNS_N],
    /// First bytes (either case) of the two-byte patterns.
    short_first: [bool; 256],
    /// First bytes of the patterns that do not start with an ASCII letter or digit: they may
    /// match anywhere, not only at a word start.
    anywhere: [bool; 256],
}

static INDEX: Index = {
    let mut ix = Index {
        start: [0; BUCKETS + 1],
        entries: [Entry {
            head: 0,
            len: 0,
            pattern: 0,
        }; PATTERNS_N],
        short_first: [false; 256],
        anywhere: [false; 256],
    };
    // A counting sort: the size of each bucket, where each starts, then the entries in order.
    let mut size = [0u16; BUCKETS + 1];
    let mut i = 0;
    while i < PATTERNS_N {
        let b = PATTERNS[i].bytes;
        if !PATTERNS[i].left {
            ix.anywhere[b[0] as usize] = true;
        }
        if b.len() >= 3 {
            size[bucket(head_of(b))] += 1;
        } else {
            size[BUCKETS] += 1;
            ix.short_first[b[0].to_ascii_lowercase() as usize] = true;
            ix.short_first[b[0].to_ascii_uppercase() as usize] = true;
        }
        i += 1;
    }
    let mut k = 0;
    while k < BUCKETS {
        ix.start[k + 1] = ix.start[k] + size[k];
        k += 1;
    }
    let mut next = ix.start;
    let mut i = 0;
    while i < PATTERNS_N {
        let b = PATTERNS[i].bytes;
        let head = head_of(b);
        let k = if b.len() >= 3 { bucket(head) } else { BUCKETS };
        ix.entries[next[k] as usize] = Entry {
            head,
            len: b.len() as u16,
            pattern: i as u16,
        };
        next[k] += 1;
        i += 1;
    }
    ix
};

/// The longest pattern that matches at `b[i..]` (the first in the lexicon among equals), and
/// where it ends.
#[inline(always)]
fn longest_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
    /// The longest of `entries` that matches `rest`, if longer than `best`.
    #[inline(always)]
    fn longest(rest: &[u8], head: u64, entries: &[Entry], best: &mut (usize, usize)) {
        for e in entries {
            let n = usize::from(e.len);
            if head & e.mask() == e.head
                && n > best.1
                && rest.len() >= n
                && (n <= 8
                    || rest[8..n]
                        .eq_ignore_ascii_case(&PATTERNS[usize::from(e.pattern)].bytes[8..]))
            {
                *best = (usize::from(e.pattern), n);
            }
        }
    }
    let rest = &b[i..];
    let head = head_of(rest);
    let mut best = (usize::MAX, 0);
    if rest.len() >= 3 {
        let k = bucket(head);
        let (from, to) = (INDEX.start[k], INDEX.start[k + 1]);
        longest(
            rest,
            head,
            &INDEX.entries[usize::from(from)..usize::from(to)],
            &mut best,
        );
    }
    if INDEX.short_first[usize::from(rest[0])] {
        let from = usize::from(INDEX.start[BUCKETS]);
        longest(rest, head, &INDEX.entries[from..], &mut best);
    }
    (best.0 != usize::MAX).then_some((best.0, i + best.1))
}

/// Lexicon hits of one group of messages (the current user turn, the system prompt, the rest).
#[derive(Clone)]
struct Hits {
    n: [u16; CUES],
    /// The first pattern (index + 1) that hit each cue, for the reasons.
    first: [u16; CUES],
    /// Where that first hit ended, in bytes from the start of its message.
    at: [u32; CUES],
    /// Hits in the opening of the message (its first [`LEAD`] bytes): where the ask's verb is.
    lead: [u16; CUES],
}

/// The opening of a message, where an imperative usually sits.
const LEAD: usize = 160;

impl Default for Hits {
    fn default() -> Self {
        Self {
            n: [0; CUES],
            first: [0; CUES],
            at: [u32::MAX; CUES],
            lead: [0; CUES],
        }
    }
}

impl Hits {
    fn n(&self, c: Cue) -> u32 {
        u32::from(self.n[c as usize])
    }
    fn has(&self, c: Cue) -> bool {
        self.n[c as usize] > 0
    }
    fn word(&self, c: Cue) -> &'static str {
        match self.first[c as usize] {
            0 => "",
            i => LEXICON[usize::from(i) - 1].0.trim_end_matches('*'),
        }
    }
    fn add(&mut self, c: Cue, pattern: usize, start: usize, end: usize) {
        let i = c as usize;
        if start < LEAD {
            self.lead[i] = self.lead[i].saturating_add(1);
        }
        if self.n[i] == 0 {
            self.first[i] = (pattern + 1) as u16;
            self.at[i] = end.min(u32::MAX as usize) as u32;
        }
        self.n[i] = self.n[i].saturating_add(1);
    }
}

/// The line structure of a group of messages.
#[derive(Debug, Default, Clone, Copy)]
struct Shape {
    bytes: usize,
    fences: u32,
    fenced_lines: u32,
    /// Code-looking lines outside fences.
    loose_code: u32,
    numbered: u32,
    bullets: u32,
    /// Stack-frame lines (`at f (file:1:2)`, `File "x.py", line 3`, `#3 0x…`).
    frames: u32,
    questions: u32,
    prose: usize,
    cjk: u32,
    newlines: u32,
}

impl Shape {
    fn code_lines(&self) -> u32 {
        self.fenced_lines + self.loose_code
    }
    fn code_blocks(&self) -> u32 {
        self.fences.div_ceil(2) + u32::from(self.fences == 0 && self.loose_code >= 5)
    }
    fn add(&mut self, o: &Shape) {
        self.bytes += o.bytes;
        self.fences += o.fences;
        self.fenced_lines += o.fenced_lines;
        self.loose_code += o.loose_code;
        self.numbered += o.numbered;
        self.bullets += o.bullets;
        self.frames += o.frames;
        self.questions += o.questions;
        self.prose += o.prose;
        self.cjk += o.cjk;
        self.newlines += o.newlines;
    }
}

/// Kinds of credentials and personal data seen (bit sets, named in the reasons).
const SECRET_KINDS: [&str; 7] = [
    "api key",
    "github token",
    "slack token",
    "aws access key",
    "private key",
    "bearer token",
    "credential assignment",
];
const PII_KINDS: [&str; 5] = [
    "e-mail address",
    "phone number",
    "card number",
    "iban",
    "keyword",
];

#[derive(Debug, Default, Clone, Copy)]
struct Sensitive {
    secrets: u8,
    pii: u8,
    pii_word: u16,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Format {
    #[default]
    Text,
    Json,
    Schema {
        properties: u32,
        depth: u32,
        enums: u32,
    },
}

/// Everything read from the body, before any decision.
#[derive(Default)]
struct Features {
    cur: Hits,
    sys: Hits,
    hist: Hits,
    /// The current turn's material (between its first and last [`INSTRUCTION`] bytes).
    body: Hits,
    cur_shape: Shape,
    sys_shape: Shape,
    hist_shape: Shape,
    sensitive: Sensitive,
    messages: u32,
    turns: u32,
    documents: u32,
    images: u32,
    tool_messages: u32,
    tool_rounds: u32,
    last_is_tool: bool,
    tools_defined: u32,
    tool_forced: bool,
    tool_choice_none: bool,
    /// Numbers in the current turn's opening (up to 2 × [`INSTRUCTION`] bytes).
    numbers: u32,
    /// A word of a defined tool's name found in the current turn's opening.
    tool_word: Option<String>,
    json_bytes: usize,
    temperature: Option<f64>,
    seed: bool,
    max_tokens: Option<u64>,
    stream: bool,
    format: Format,
}

#[derive(Clone, Copy, PartialEq)]
enum Group {
    Current,
    System,
    History,
}

impl Features {
    fn read(body: &Map<String, Value>, stream: bool) -> Features {
        let mut f = Features {
            stream,
            json_bytes: json_len(body),
            ..Features::default()
        };
        let empty = Vec::new();
        let messages = match body.get("messages") {
            Some(Value::Array(m)) => m,
            _ => &empty,
        };
        let current = messages
            .iter()
            .rposition(|m| role(m) == "user")
            .unwrap_or(usize::MAX);
        f.messages = messages.len() as u32;
        f.last_is_tool = messages
            .last()
            .is_some_and(|m| matches!(role(m), "tool" | "function"));
        for (i, m) in messages.iter().enumerate() {
            let r = role(m);
            let group = match r {
                _ if i == current => Group::Current,
                "system" | "developer" => Group::System,
                _ => Group::History,
            };
            match r {
                "user" | "assistant" => f.turns += 1,
                "tool" | "function" => f.tool_messages += 1,
                _ => {}
            }
            if m.get("tool_calls").is_some_and(|t| !t.is_null())
                || m.get("function_call").is_some_and(|t| !t.is_null())
            {
                f.tool_rounds += 1;
            }
            let mut shape = Shape::default();
            let mut offset = 0usize;
            match m.get("content") {
                Some(Value::String(s)) => {
                    f.text(s, group, r == "assistant", &mut shape, &mut offset)
                }
                Some(Value::Array(parts)) => {
                    for p in parts {
                        match p.get("type").and_then(Value::as_str).unwrap_or("text") {
                            "text" | "input_text" => {
                                if let Some(s) = p.get("text").and_then(Value::as_str) {
                                    f.text(s, group, r == "assistant", &mut shape, &mut offset);
                                }
                            }
                            "image_url" | "input_image" | "image" => f.images += 1,
                            "file" | "input_file" | "document" => f.documents += 1,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
            // A long stretch of prose in one message is a pasted document.
            if r != "assistant" && shape.prose >= 3000 {
                f.documents += 1;
            }
            match group {
                Group::Current => f.cur_shape.add(&shape),
                Group::System => f.sys_shape.add(&shape),
                Group::History => f.hist_shape.add(&shape),
            }
        }
        f.documents += (f.any(Cue::DocMarker) + f.hist.n(Cue::DocMarker)) / 2;
        let tools = match (body.get("tools"), body.get("functions")) {
            (Some(Value::Array(tools)), _) | (_, Some(Value::Array(tools))) => tools.as_slice(),
            _ => &[],
        };
        f.tools_defined = tools.len() as u32;
        if !tools.is_empty() && current != usize::MAX {
            f.tool_word = tool_word(tools, &messages[current]);
        }
        match body.get("tool_choice") {
            Some(Value::String(s)) if s == "required" || s == "any" => f.tool_forced = true,
            Some(Value::String(s)) if s == "none" => f.tool_choice_none = true,
            Some(Value::Object(_)) => f.tool_forced = true,
            _ => {}
        }
        f.temperature = body.get("temperature").and_then(Value::as_f64);
        f.seed = body.get("seed").is_some_and(|s| !s.is_null());
        f.max_tokens = body
            .get("max_tokens")
            .or_else(|| body.get("max_completion_tokens"))
            .and_then(Value::as_u64);
        f.format = match body.get("response_format") {
            Some(Value::Object(rf)) => match rf.get("type").and_then(Value::as_str) {
                Some("json_object") => Format::Json,
                Some("json_schema") => {
                    let schema = rf
                        .get("json_schema")
                        .and_then(|s| s.get("schema"))
                        .unwrap_or(&Value::Null);
                    let (properties, depth) = schema_size(schema, 0);
                    Format::Schema {
                        properties,
                        depth,
                        enums: schema_enums(schema, 0),
                    }
                }
                _ => Format::Text,
            },
            _ => Format::Text,
        };
        f
    }

    /// Reads one piece of text: the lexicons over the parts the caps allow, the line scan
    /// over all of it. In the current turn only the first and last [`INSTRUCTION`] bytes count
    /// as the ask; the rest (a pasted document, code) is the material, weighed less.
    fn text(
        &mut self,
        s: &str,
        group: Group,
        assistant: bool,
        shape: &mut Shape,
        offset: &mut usize,
    ) {
        let b = s.as_bytes();
        let sensitive = &mut self.sensitive;
        let (ask, material) = match group {
            Group::Current => (&mut self.cur, &mut self.body),
            Group::System => (&mut self.sys, &mut self.body),
            Group::History => (&mut self.hist, &mut self.body),
        };
        let capped = |hits: &mut Hits,
                      sensitive: &mut Sensitive,
                      from: usize,
                      to: usize,
                      head: usize,
                      tail: usize| {
            if to - from <= head + tail {
                scan(&b[from..to], *offset + from, hits, sensitive);
            } else {
                scan(&b[from..from + head], *offset + from, hits, sensitive);
                scan(&b[to - tail..to], *offset + to - tail, hits, sensitive);
            }
        };
        match group {
            Group::Current if b.len() > 2 * INSTRUCTION => {
                capped(ask, sensitive, 0, INSTRUCTION, INSTRUCTION, 0);
                capped(
                    material,
                    sensitive,
                    INSTRUCTION,
                    b.len() - INSTRUCTION,
                    MATERIAL_HEAD,
                    MATERIAL_TAIL,
                );
                capped(
                    ask,
                    sensitive,
                    b.len() - INSTRUCTION,
                    b.len(),
                    INSTRUCTION,
                    0,
                );
            }
            Group::Current => capped(ask, sensitive, 0, b.len(), b.len(), 0),
            Group::System => capped(ask, sensitive, 0, b.len(), SYSTEM_HEAD, SYSTEM_TAIL),
            Group::History if !assistant => {
                capped(ask, sensitive, 0, b.len(), HISTORY_HEAD, HISTORY_TAIL)
            }
            Group::History => {}
        }
        if group == Group::Current {
            self.numbers += numbers(&b[..b.len().min(2 * INSTRUCTION)]);
        }
        *offset += b.len() + 1;
        lines(s, shape);
    }

    /// Hits in the ask (current turn's instruction and system prompt).
    fn c(&self, cue: Cue) -> u32 {
        self.cur.n(cue) + self.sys.n(cue)
    }

    /// Hits anywhere but earlier turns: for structure (traces, notation) and templates.
    fn any(&self, cue: Cue) -> u32 {
        self.c(cue) + self.body.n(cue)
    }

    fn word(&self, cue: Cue) -> &'static str {
        [&self.cur, &self.sys, &self.body, &self.hist]
            .into_iter()
            .map(|h| h.word(cue))
            .find(|w| !w.is_empty())
            .unwrap_or("")
    }

    fn all_shape(&self) -> Shape {
        let mut s = self.cur_shape;
        s.add(&self.sys_shape);
        s.add(&self.hist_shape);
        s
    }

    fn tokens(&self) -> u32 {
        let newlines = self.all_shape().newlines as usize;
        crate::quota::estimate_prompt_tokens(self.json_bytes + newlines).min(u64::from(u32::MAX))
            as u32
    }

    /// Which client chore this is, if one: the structure of the known templates.
    fn background(&self) -> Option<(Background, Vec<String>)> {
        use Cue::*;
        let c = |cue| self.any(cue);
        if c(Fim) > 0 {
            return Some((
                Background::Autocomplete,
                vec![format!("fim marker: {}", self.word(Fim))],
            ));
        }
        if c(HoleFill) > 0 {
            return Some((
                Background::Autocomplete,
                vec![format!("hole-filler template: {}", self.word(HoleFill))],
            ));
        }
        let header = c(TaskHeader) > 0;
        let history = c(ChatHistory) > 0;
        if header || history {
            // The answer's shape is stated before the history; keys inside the history
            // (quoted by the user) come after it and do not count when the template has one.
            let at = |cue: Cue| {
                let i = cue as usize;
                self.cur.at[i].min(self.sys.at[i]).min(self.body.at[i])
            };
            let hist_at = at(ChatHistory);
            let before = |cue: Cue| at(cue) < hist_at || (hist_at == u32::MAX && c(cue) > 0);
            let kind = if c(TypeTag) > 0 && (before(KeyText) || c(KeyText) > 0) {
                Some((Background::Autocomplete, "{\"text\"} + <type>"))
            } else if before(KeyFollowUps) {
                Some((Background::FollowUps, "{\"follow_ups\"}"))
            } else if before(KeyQueries) {
                Some((Background::QueryGeneration, "{\"queries\"}"))
            } else if before(KeyTags) {
                Some((Background::Tags, "{\"tags\"}"))
            } else if before(KeyTitle) || before(TitleAsk) {
                Some((Background::Title, "{\"title\"}"))
            } else if before(KeyPrompt) {
                Some((Background::Other, "{\"prompt\"}"))
            } else if header && history {
                Some((Background::Other, "task header"))
            } else {
                None
            };
            if let Some((kind, shape)) = kind {
                let mut why = Vec::with_capacity(3);
                if header {
                    why.push("openwebui template: ### Task:".to_owned());
                }
                if history {
                    why.push("openwebui template: <chat_history>".to_owned());
                }
                why.push(format!("answer shape: {shape}"));
                return Some((kind, why));
            }
        }
        if c(EmojiAsk) > 0 && !self.cur.word(EmojiAsk).is_empty() && self.messages <= 2 {
            return Some((
                Background::Other,
                vec!["openwebui emoji template".to_owned()],
            ));
        }
        if c(TitleAsk) > 0 && self.tools_defined == 0 {
            let mut why = vec![format!("title chore: {}", self.word(TitleAsk))];
            if let Some(m) = self.max_tokens.filter(|&m| m <= 64) {
                why.push(format!("max_tokens: {m}"));
            }
            return Some((Background::Title, why));
        }
        if c(Memory) > 0 {
            return Some((
                Background::Other,
                vec![format!("memory chore: {}", self.word(Memory))],
            ));
        }
        if c(ToolSelect) >= 2 {
            return Some((
                Background::Other,
                vec!["tool-selection template".to_owned()],
            ));
        }
        None
    }
}

/// The first word (4+ letters) of a tool's name that the opening of `message` mentions: the
/// ask is for that tool. Reads at most 40 tools and the first [`INSTRUCTION`] bytes.
fn tool_word(tools: &[Value], message: &Value) -> Option<String> {
    let text = match message.get("content") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(parts)) => parts
            .iter()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .unwrap_or(""),
        _ => "",
    };
    let b = text.as_bytes();
    let opening = b[..b.len().min(INSTRUCTION)].to_ascii_lowercase();
    tools.iter().take(40).find_map(|t| {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .or_else(|| t.get("name"))
            .and_then(Value::as_str)?;
        name.split(['_', '-', '.'])
            .filter(|w| {
                w.len() >= 4
                    && !matches!(
                        *w,
                        "list" | "create" | "update" | "search" | "query" | "file" | "call"
                    )
            })
            .find(|w| {
                let w = w.to_ascii_lowercase();
                let w = w.as_bytes();
                opening.windows(w.len()).any(|x| x == w)
            })
            .map(str::to_owned)
    })
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

/// The length of `v` serialised as compact JSON, give or take escapes and number digits.
fn json_len(map: &Map<String, Value>) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::Null => 4,
            Value::Bool(b) => 4 + usize::from(!b),
            Value::Number(n) => n
                .as_u64()
                .map_or(6, |n| (n.checked_ilog10().unwrap_or(0) + 1) as usize),
            Value::String(s) => s.len() + 2,
            Value::Array(a) => 2 + a.len().saturating_sub(1) + a.iter().map(value).sum::<usize>(),
            Value::Object(o) => object(o),
        }
    }
    fn object(o: &Map<String, Value>) -> usize {
        2 + o.len().saturating_sub(1) + o.iter().map(|(k, v)| k.len() + 3 + value(v)).sum::<usize>()
    }
    object(map)
}

/// Properties and nesting depth of a JSON schema.
fn schema_size(v: &Value, depth: u32) -> (u32, u32) {
    if depth > 32 {
        return (0, depth);
    }
    let mut props = 0;
    let mut max_depth = depth;
    if let Some(Value::Object(p)) = v.get("properties") {
        for (_, s) in p {
            props += 1;
            let (n, d) = schema_size(s, depth + 1);
            props += n;
            max_depth = max_depth.max(d);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(s) = v.get(key).filter(|s| s.is_object()) {
            let (n, d) = schema_size(s, depth + 1);
            props += n;
            max_depth = max_depth.max(d);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(list)) = v.get(key) {
            for s in list {
                let (n, d) = schema_size(s, depth);
                props += n;
                max_depth = max_depth.max(d);
            }
        }
    }
    if let Some(Value::Object(defs)) = v.get("$defs").or_else(|| v.get("definitions")) {
        for (_, s) in defs {
            let (n, d) = schema_size(s, depth);
            props += n;
            max_depth = max_depth.max(d);
        }
    }
    (props, max_depth)
}

/// `enum`s in a JSON schema (labels to choose among).
fn schema_enums(v: &Value, depth: u32) -> u32 {
    match v {
        _ if depth > 32 => 0,
        Value::Object(o) => {
            u32::from(o.get("enum").is_some_and(Value::is_array))
                + o.iter()
                    .filter(|(k, _)| *k != "enum")
                    .map(|(_, v)| schema_enums(v, depth + 1))
                    .sum::<u32>()
        }
        Value::Array(a) => a.iter().map(|v| schema_enums(v, depth + 1)).sum(),
        _ => 0,
    }
}

/// One pass of the lexicons over `b`, plus the checks its security hits call for.
///
/// Leftmost-longest and non-overlapping, as one automaton would: a pattern that starts with an
/// ASCII letter or digit is tried at word starts only (inside a word its boundary would reject
/// it), the others (`` ``` ``, `"title"`, `\frac`, `∑`, `翻译`…) at every byte they can start
/// with; where several match, the longest wins (the first in the lexicon among equals), and the
/// scan goes on after it. Each try is one look-up in [`INDEX`] by the next three bytes and a
/// compare of eight bytes per pattern there.
fn scan(b: &[u8], offset: usize, hits: &mut Hits, sensitive: &mut Sensitive) {
    let mut fenced = false;
    let n = b.len();
    let mut i = 0;
    while i < n {
        let c = b[i];
        let candidate = if c.is_ascii_alphanumeric() {
            i == 0 || !is_word_byte(b[i - 1])
        } else {
            INDEX.anywhere[usize::from(c)]
        };
        let Some((pattern, end)) = candidate.then(|| longest_at(b, i)).flatten() else {
            i += 1;
            // The rest of a word: no pattern starts there.
            if c.is_ascii_alphanumeric() {
                while i < n && b[i].is_ascii_alphanumeric() {
                    i += 1;
                }
            }
            continue;
        };
        let start = i;
        i = end;
        let Pattern {
            cue, left, right, ..
        } = PATTERNS[pattern];
        if cue == Cue::Fence {
            let line_start = b[..start]
                .iter()
                .rev()
                .take_while(|&&c| c == b' ' || c == b'\t')
                .count();
            let at = start - line_start;
            if at == 0 || b[at - 1] == b'\n' {
                fenced = !fenced;
            }
            continue;
        }
        if fenced && cue.is_prose() {
            continue;
        }
        if left && start > 0 && is_word_byte(b[start - 1]) {
            continue;
        }
        if right && end < n && is_word_byte(b[end]) {
            continue;
        }
        match cue {
            Cue::Secret => match secret_at(b, start, end) {
                Some(kind) => sensitive.secrets |= 1 << kind,
                None => continue,
            },
            Cue::SecretKv => {
                if assigned_value(b, end) {
                    sensitive.secrets |= 1 << 6;
                } else {
                    continue;
                }
            }
            Cue::PiiWord => sensitive.pii_word += 1,
            _ => {}
        }
        hits.add(cue, pattern, offset + start, offset + end);
    }
    personal_data(b, sensitive);
}

/// Runs of digits (a number, with its decimal part) in `b`.
fn numbers(b: &[u8]) -> u32 {
    let mut n = 0;
    let mut prev = false;
    for &c in b {
        let digit = c.is_ascii_digit();
        if digit && !prev {
            n += 1;
        }
        prev = digit || (prev && matches!(c, b'.' | b','));
    }
    n
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

fn token_run(b: &[u8], from: usize, ok: impl Fn(u8) -> bool) -> usize {
    b.get(from..).map_or(0, |rest| {
        rest.iter().take(64).take_while(|&&c| ok(c)).count()
    })
}

fn token_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Whether a credential prefix at `start..end` starts a real-looking credential: its kind.
fn secret_at(b: &[u8], start: usize, end: usize) -> Option<u8> {
    let p = &b[start..end];
    let run = |ok: fn(u8) -> bool| token_run(b, end, ok);
    match p[0].to_ascii_lowercase() {
        b's' if run(token_byte) >= 20 => Some(0),
        b'g' if run(token_byte) >= 20 => Some(1),
        b'x' if run(token_byte) >= 10 => Some(2),
        b'a' if p == b"AKIA" && run(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) >= 16 => {
            Some(3)
        }
        b'a' if p == b"AIza" && run(token_byte) >= 30 => Some(0),
        b'-' => {
            let window = &b[end..b.len().min(end + 40)];
            window.windows(11).any(|w| w == b"PRIVATE KEY").then_some(4)
        }
        b'b' if run(|c| token_byte(c) || c == b'.' || c == b'=') >= 20 => Some(5),
        b'e' if p == b"eyJ" => {
            let n = run(|c| token_byte(c) || c == b'.');
            let dots = b[end..end + n].iter().filter(|&&c| c == b'.').count();
            (n >= 30 && dots >= 2).then_some(5)
        }
        _ => None,
    }
}

/// After `password`, `api_key`…: an `=` or `:` then a value that is not a placeholder.
fn assigned_value(b: &[u8], end: usize) -> bool {
    let mut i = end;
    let mut skipped = 0;
    while i < b.len() && skipped < 4 && matches!(b[i], b'"' | b'\'' | b' ' | b'_' | b'\t') {
        i += 1;
        skipped += 1;
    }
    if i >= b.len() || !matches!(b[i], b'=' | b':') {
        return false;
    }
    i += 1;
    while i < b.len() && matches!(b[i], b' ' | b'"' | b'\'' | b'\t') {
        i += 1;
    }
    let n = token_run(b, i, |c| {
        c.is_ascii_graphic() && !matches!(c, b'"' | b'\'' | b',' | b';')
    });
    if n < 6 {
        return false;
    }
    let value = &b[i..i + n];
    let placeholder = value[0] == b'<'
        || value[0] == b'$'
        || value[0] == b'{'
        || value.iter().all(|&c| c == b'*' || c == b'x' || c == b'X')
        || value.starts_with(b"os.")
        || value.starts_with(b"process.")
        || value.starts_with(b"env")
        || value.starts_with(b"your");
    !placeholder
}

/// E-mail addresses, phone numbers, card numbers (Luhn) and IBANs, in one pass over `b`.
fn personal_data(b: &[u8], s: &mut Sensitive) {
    let mut i = 0;
    let mut ats = 0;
    while i < b.len() {
        // Eight bytes at a time to the next one that can start something.
        while let Some(x) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
            if digit_or_at(u64::from_le_bytes(*x)) {
                break;
            }
            i += 8;
        }
        let Some(&c) = b.get(i) else { break };
        if c == b'@' && ats < 64 {
            ats += 1;
            let local = b[..i]
                .iter()
                .rev()
                .take_while(|&&c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-')
                })
                .count();
            let domain = token_run(b, i + 1, |c| {
                c.is_ascii_alphanumeric() || c == b'.' || c == b'-'
            });
            let d = &b[i + 1..i + 1 + domain];
            if local > 0 && d.contains(&b'.') && d.last().is_some_and(u8::is_ascii_alphabetic) {
                s.pii |= 1;
            }
            i += 1;
        } else if c.is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            // A run of digits with single separators between groups.
            let mut j = i;
            let mut digits = [0u8; 20];
            let mut n = 0usize;
            let mut separators = 0;
            while j < b.len() {
                if b[j].is_ascii_digit() {
                    if n < digits.len() {
                        digits[n] = b[j] - b'0';
                    }
                    n += 1;
                    j += 1;
                } else if matches!(b[j], b' ' | b'-' | b'.')
                    && j + 1 < b.len()
                    && b[j + 1].is_ascii_digit()
                {
                    separators += 1;
                    j += 1;
                } else {
                    break;
                }
            }
            let ends_clean = j >= b.len() || !b[j].is_ascii_alphanumeric();
            let plus = i > 0 && b[i - 1] == b'+';
            let iban = i >= 2
                && b[i - 1].is_ascii_uppercase()
                && b[i - 2].is_ascii_uppercase()
                && (i < 3 || !b[i - 3].is_ascii_alphanumeric())
                && iban_tail(b, i) >= 14;
            if iban {
                s.pii |= 1 << 3;
            } else if ends_clean
                && (13..=19).contains(&n)
                && (separators >= 3 || n == 16)
                && luhn(&digits[..n.min(20)])
            {
                s.pii |= 1 << 2;
            } else if ends_clean
                && ((plus && (9..=15).contains(&n)) || (separators >= 2 && (10..=12).contains(&n)))
            {
                s.pii |= 1 << 1;
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
}

/// Whether one of eight bytes is in `0x30..=0x40` (a digit, `:;<=>?` or `@`): the
/// "has between" test of Bit Twiddling Hacks, exact as no byte carries into the next.
#[inline(always)]
fn digit_or_at(x: u64) -> bool {
    const L: u64 = 0x0101_0101_0101_0101;
    let low7 = x & (0x7F * L);
    let below = ((0x7F + 0x41) * L).wrapping_sub(low7);
    let above = low7.wrapping_add((0x7F - 0x2F) * L);
    below & !x & above & (0x80 * L) != 0
}

/// How many bytes of `b` satisfy `f` (counted in bytes per 255-byte chunk, which vectorises).
#[inline(always)]
fn count(b: &[u8], f: impl Fn(u8) -> bool) -> u32 {
    b.chunks(255)
        .map(|c| u32::from(c.iter().fold(0u8, |n, &x| n + u8::from(f(x)))))
        .sum()
}

fn iban_tail(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .take(40)
        .take_while(|&&c| c.is_ascii_alphanumeric() || c == b' ')
        .filter(|&&c| c != b' ')
        .count()
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// A prefix of up to eight bytes as a little-endian word, and the mask of its bytes.
const fn prefix(p: &[u8]) -> (u64, u64) {
    assert!(!p.is_empty() && p.len() <= 8);
    let mask = if p.len() == 8 {
        u64::MAX
    } else {
        (1 << (8 * p.len())) - 1
    };
    (word8(p), mask)
}

/// Whether the text whose first eight bytes are `head` ([`word8`]) starts with `prefix`.
#[inline(always)]
fn starts(head: u64, (p, mask): (u64, u64)) -> bool {
    head & mask == p
}

/// The line scan: fences, code-looking lines, stack frames, lists, questions, CJK script.
fn lines(s: &str, shape: &mut Shape) {
    const FENCE: (u64, u64) = prefix(b"```");
    const TILDES: (u64, u64) = prefix(b"~~~");
    let b = s.as_bytes();
    shape.bytes += b.len();
    shape.cjk += count(b, |c| (0xE3..=0xED).contains(&c));
    let mut in_fence = false;
    let mut newlines = 0;
    for line in s.split('\n') {
        newlines += 1;
        // `trim_start`, without its Unicode look-ups for the usual ASCII indent.
        let l = line.as_bytes();
        let indent = l.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
        let t = match l.get(indent) {
            Some(c) if !c.is_ascii_graphic() => line.trim_start().as_bytes(),
            _ => &l[indent..],
        };
        let head = word8(t);
        if starts(head, FENCE) || starts(head, TILDES) {
            shape.fences += 1;
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            shape.fenced_lines += 1;
            continue;
        }
        if t.is_empty() {
            continue;
        }
        if is_frame(t, head) {
            shape.frames += 1;
            continue;
        }
        if looks_like_code(line.as_bytes(), t, head) {
            shape.loose_code += 1;
            continue;
        }
        shape.prose += line.len();
        shape.questions += count(t, |c| c == b'?');
        let digits = t.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && digits <= 2 && matches!(t.get(digits), Some(b'.' | b')')) {
            shape.numbered += 1;
        } else if t.len() > 1 && matches!(t[0], b'-' | b'*' | b'+') && t[1] == b' ' {
            shape.bullets += 1;
        }
    }
    shape.newlines += newlines - 1;
}

/// `t` is a trimmed line, `head` its first eight bytes.
fn is_frame(t: &[u8], head: u64) -> bool {
    const AT: (u64, u64) = prefix(b"at ");
    const FILE: (u64, u64) = prefix(b"File \"");
    (starts(head, AT) && t.len() < 400 && (t.contains(&b'(') || t.contains(&b':')))
        || starts(head, FILE)
        || (t.first() == Some(&b'#')
            && t.get(1).is_some_and(u8::is_ascii_digit)
            && t.windows(3).any(|w| w == b" 0x"))
}

/// Line starts that mark code, by their first byte (so most lines compare nothing).
fn code_start(t: &[u8], head: u64) -> bool {
    const STARTS: [&[u8]; 34] = [
        b"def ",
        b"fn ",
        b"pub ",
        b"class ",
        b"import ",
        b"from ",
        b"#include",
        b"public ",
        b"private ",
        b"return ",
        b"let ",
        b"const ",
        b"var ",
        b"func ",
        b"package ",
        b"if (",
        b"for (",
        b"while (",
        b"//",
        b"use ",
        b"impl ",
        b"struct ",
        b"SELECT ",
        b"INSERT ",
        b"CREATE ",
        b"async ",
        b"await ",
        b"elif ",
        b"else:",
        b"try:",
        b"except",
        b"self.",
        b"this.",
        b"<div",
    ];
    const DIV: (u64, u64) = prefix(b"<div");
    const PREFIXES: [(u64, u64); STARTS.len()] = {
        let mut out = [(0, 0); STARTS.len()];
        let mut i = 0;
        while i < STARTS.len() {
            out[i] = prefix(STARTS[i]);
            i += 1;
        }
        out
    };
    match t.first() {
        Some(b'}' | b'@') => true,
        Some(b'<') => t.get(1) == Some(&b'/') || starts(head, DIV),
        Some(
            b'd' | b'f' | b'p' | b'c' | b'i' | b'#' | b'r' | b'l' | b'v' | b'w' | b'/' | b'u'
            | b's' | b'S' | b'I' | b'C' | b'a' | b'e' | b't',
        ) => PREFIXES.iter().any(|&p| starts(head, p)),
        _ => false,
    }
}

/// `line` as it is, `t` trimmed, `head` the first eight bytes of `t`.
fn looks_like_code(line: &[u8], t: &[u8], head: u64) -> bool {
    const DEF: (u64, u64) = prefix(b"def ");
    const IF: (u64, u64) = prefix(b"if ");
    const FOR: (u64, u64) = prefix(b"for ");
    let end = t
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let t_end = &t[..end];
    matches!(t_end.last(), Some(b';' | b'{' | b'}'))
        || (t_end.last() == Some(&b':')
            && (starts(head, DEF) || starts(head, IF) || starts(head, FOR)))
        || code_start(t, head)
        || (line.starts_with(b"    ") && t_end.last() == Some(&b')') && !t_end.contains(&b' '))
}

// ---------------------------------------------------------------------------------------------
// Decisions.

impl Features {
    fn profile(self, economic: Economic) -> Profile {
        let all = self.all_shape();
        let context = Context {
            tokens: self.tokens(),
            turns: self.turns,
            documents: self.documents,
            code_blocks: all.code_blocks(),
            images: self.images,
        };
        let mut context_why = vec![format!("tokens: {} (body bytes/4)", context.tokens)];
        if context.turns > 1 {
            context_why.push(format!("turns: {}", context.turns));
        }
        if context.documents > 0 {
            context_why.push(format!("documents: {}", context.documents));
        }
        if all.fences > 0 {
            context_why.push(format!("code fences: {}", all.fences));
        }
        if all.loose_code > 0 {
            context_why.push(format!("code lines outside fences: {}", all.loose_code));
        }
        if context.images > 0 {
            context_why.push(format!("images: {}", context.images));
        }
        if all.cjk > 0 {
            context_why.push(format!("cjk characters: {}", all.cjk));
        }

        let tools = Tools {
            defined: self.tools_defined,
            forced: self.tool_forced,
            in_flight: self.tool_rounds > 0 || self.tool_messages > 0,
        };
        let mut tools_why = Vec::new();
        if tools.defined > 0 {
            tools_why.push(format!("tools defined: {}", tools.defined));
        }
        if tools.forced {
            tools_why.push("tool_choice forces a call".to_owned());
        }
        if tools.in_flight {
            tools_why.push(format!(
                "tool rounds: {}, tool results: {}",
                self.tool_rounds, self.tool_messages
            ));
        }

        let determinism = Determinism {
            temperature: self.temperature,
            seed: self.seed,
            json: self.format != Format::Text,
        };
        let mut det_why = Vec::new();
        if let Some(t) = self.temperature {
            det_why.push(format!("temperature: {t}"));
        }
        if self.seed {
            det_why.push("seed set".to_owned());
        }
        match self.format {
            Format::Json => det_why.push("response_format: json_object".to_owned()),
            Format::Schema { .. } => det_why.push("response_format: json_schema".to_owned()),
            Format::Text => {}
        }

        let (security, security_why) = self.security();
        let economic_dim = Dim::new(economic, economic_reasons(&economic));

        if let Some((kind, why)) = self.background() {
            let latency = if kind == Background::Autocomplete {
                Dim::new(
                    Latency::Interactive,
                    vec!["autocomplete: someone is typing".to_owned()],
                )
            } else {
                Dim::new(
                    Latency::Background,
                    vec!["client chore: nobody waits".to_owned()],
                )
            };
            let output = if kind == Background::Autocomplete
                && self.c(Cue::Fim) + self.c(Cue::HoleFill) > 0
            {
                Dim::new(Output::Code, vec!["fill-in-the-middle: code".to_owned()])
            } else if self.format != Format::Text
                || self.c(Cue::JsonAsk) > 0
                || self.c(Cue::TaskHeader) > 0
            {
                Dim::new(Output::Json, vec!["template asks for JSON".to_owned()])
            } else {
                Dim::new(Output::FreeText, vec!["short free text".to_owned()])
            };
            return Profile {
                family: Dim::new(Family::Background, why),
                background: Some(kind),
                depth: Dim::new(Level::Low, vec!["client chore".to_owned()]),
                precision: Dim::new(Level::Low, vec!["client chore".to_owned()]),
                latency,
                context: Dim::new(context, context_why),
                tools: Dim::new(tools, tools_why),
                determinism: Dim::new(determinism, det_why),
                security: Dim::new(security, security_why),
                output,
                economic: economic_dim,
                tier: Dim::new(
                    Tier::Free,
                    vec!["client chore: the cheapest model serves it".to_owned()],
                ),
            };
        }

        let (family, family_why) = self.family(&tools);
        let (depth, depth_why) = self.depth(family, &context);
        let (precision, precision_why) = self.precision(family);
        let latency = if self.stream {
            Dim::new(Latency::Interactive, vec!["stream: true".to_owned()])
        } else {
            Dim::new(Latency::Standard, vec!["stream: false".to_owned()])
        };
        let output = self.output(family);
        let (tier, tier_why) = self.tier(family, depth, precision, &context, &tools);
        Profile {
            family: Dim::new(family, family_why),
            background: None,
            depth: Dim::new(depth, depth_why),
            precision: Dim::new(precision, precision_why),
            latency,
            context: Dim::new(context, context_why),
            tools: Dim::new(tools, tools_why),
            determinism: Dim::new(determinism, det_why),
            security: Dim::new(security, security_why),
            output,
            economic: economic_dim,
            tier: Dim::new(tier, tier_why),
        }
    }

    /// A weighted count of a cue: the current turn counts double, the system prompt once,
    /// earlier turns a quarter; each group's count is capped so one long text cannot swamp.
    fn w(&self, cue: Cue) -> f32 {
        let cap = |n: u32| n.min(4) as f32;
        2.0 * cap(self.cur.n(cue))
            + 2.0 * cap(u32::from(self.cur.lead[cue as usize]))
            + cap(self.sys.n(cue))
            + 0.5 * cap(self.body.n(cue))
            + 0.25 * cap(self.hist.n(cue))
    }

    fn family(&self, tools: &Tools) -> (Family, Vec<String>) {
        use Cue::*;
        let cur = &self.cur_shape;
        let hist_code = self.hist_shape.code_lines() > 0 || self.sys_shape.code_lines() > 0;
        let traces = self.any(Trace) + cur.frames.min(3);
        let mut scores: [(Family, f32, Vec<String>); 9] = [
            (Family::Code, 0.0, Vec::new()),
            (Family::Math, 0.0, Vec::new()),
            (Family::Extraction, 0.0, Vec::new()),
            (Family::Summarisation, 0.0, Vec::new()),
            (Family::Translation, 0.0, Vec::new()),
            (Family::Creative, 0.0, Vec::new()),
            (Family::Reasoning, 0.0, Vec::new()),
            (Family::Classification, 0.0, Vec::new()),
            (Family::Chat, 0.0, Vec::new()),
        ];
        let mut add = |f: Family, points: f32, why: String| {
            if points > 0.0 {
                let s = scores.iter_mut().find(|s| s.0 == f).unwrap();
                s.1 += points;
                if s.2.len() < 4 {
                    s.2.push(why);
                }
            }
        };
        let kw = |cue: Cue| format!("keyword: {}", self.word(cue));
        let code_context = self.w(Code) > 0.0 || cur.code_lines() > 0 || hist_code || traces > 0;
        // Code. Design words (architecture, migration…) count only beside code or its words.
        add(Family::Code, self.w(Code), kw(Code));
        if code_context {
            add(Family::Code, 1.5 * self.w(CodeHard), kw(CodeHard));
        }
        add(
            Family::Code,
            self.w(CodeWrite)
                * if self.w(Code) > 0.0 || hist_code {
                    1.5
                } else {
                    0.5
                },
            kw(CodeWrite),
        );
        // Code that is a sliver of a long text is an excerpt of a document, not the task.
        let code_lines = cur.code_lines() as f32;
        let share = code_lines / (code_lines + cur.prose as f32 / 60.0).max(1.0);
        let damp = if share < 0.15 { 0.3 } else { 1.0 };
        add(
            Family::Code,
            damp * 3.0 * cur.fences.div_ceil(2).min(3) as f32,
            format!("code fences: {}", cur.fences),
        );
        if cur.loose_code >= 3 {
            add(
                Family::Code,
                damp * 3.0,
                format!("code lines: {}", cur.loose_code),
            );
        }
        add(
            Family::Code,
            2.0 * traces.min(3) as f32,
            format!("stack trace markers: {traces}"),
        );
        if hist_code {
            add(
                Family::Code,
                1.0,
                "code earlier in the conversation".to_owned(),
            );
        }
        // Mathematics.
        add(Family::Math, 1.5 * self.w(Math), kw(Math));
        add(Family::Math, 2.5 * self.w(MathHard), kw(MathHard));
        add(
            Family::Math,
            1.5 * self.any(Latex).min(4) as f32,
            format!("math notation: {}", self.any(Latex)),
        );
        if self.numbers >= 2 && cur.bytes < 300 && cur.code_lines() == 0 {
            add(
                Family::Math,
                2.0,
                format!("numbers in a short ask: {}", self.numbers),
            );
        }
        // Extraction.
        add(Family::Extraction, 2.0 * self.w(Extract), kw(Extract));
        match self.format {
            Format::Schema {
                properties, enums, ..
            } if enums > 0 && properties <= 4 => add(
                Family::Classification,
                2.0,
                format!("json schema: {enums} enums"),
            ),
            Format::Schema { .. } => add(Family::Extraction, 2.0, "json schema output".to_owned()),
            Format::Json => add(Family::Extraction, 1.0, "json output".to_owned()),
            Format::Text => {}
        }
        // Summarisation.
        add(
            Family::Summarisation,
            2.5 * self.w(Summarise),
            kw(Summarise),
        );
        if self.c(Summarise) > 0 && self.documents > 0 {
            add(
                Family::Summarisation,
                2.0,
                format!("documents: {}", self.documents),
            );
        }
        // Translation: a translation verb, or target language names with foreign script.
        add(Family::Translation, 3.0 * self.w(Translate), kw(Translate));
        if self.c(Translate) > 0 && self.c(Language) > 0 {
            add(
                Family::Translation,
                2.0,
                format!("language: {}", self.word(Language)),
            );
        }
        if cur.cjk > 4 && cur.cjk < cur.bytes as u32 / 3 && self.c(Language) > 0 {
            add(
                Family::Translation,
                2.0,
                "cjk script beside latin".to_owned(),
            );
        }
        // Creative writing.
        add(Family::Creative, 2.0 * self.w(Creative), kw(Creative));
        if self.temperature.is_some_and(|t| t >= 1.0) {
            add(Family::Creative, 1.0, "temperature >= 1".to_owned());
        }
        // Reasoning.
        add(Family::Reasoning, self.w(Reason), kw(Reason));
        add(Family::Reasoning, 1.5 * self.w(ReasonHard), kw(ReasonHard));
        let constraints = self.constraints();
        if constraints >= 4 {
            add(
                Family::Reasoning,
                1.0,
                format!("numbered constraints: {constraints}"),
            );
        }
        // Classification.
        add(Family::Classification, 2.5 * self.w(Classify), kw(Classify));
        if self.max_tokens.is_some_and(|m| m <= 10) {
            add(Family::Classification, 1.0, "max_tokens <= 10".to_owned());
        }

        scores.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (best, score, why) = scores.into_iter().next().unwrap();

        // Tool use: the conversation is in an agent loop, or a call is forced, or the ask is
        // an action the defined tools serve and nothing else dominates.
        if tools.defined > 0 && !self.tool_choice_none {
            if tools.forced {
                return (
                    Family::ToolUse,
                    vec![
                        "tool_choice forces a call".to_owned(),
                        format!("tools defined: {}", tools.defined),
                    ],
                );
            }
            if self.last_is_tool {
                return (
                    Family::ToolUse,
                    vec!["last message is a tool result".to_owned()],
                );
            }
            let action =
                self.w(Action) + self.w(Agentic) + if self.tool_word.is_some() { 3.0 } else { 0.0 };
            if action >= 2.0 && action >= score * 0.5 {
                let mut why = vec![format!("tools defined: {}", tools.defined)];
                if let Some(w) = &self.tool_word {
                    why.push(format!("tool name in the ask: {w}"));
                }
                if self.w(Action) > 0.0 {
                    why.push(kw(Action));
                }
                return (Family::ToolUse, why);
            }
        }
        if score < 2.0 {
            return (Family::Chat, vec!["no task cue".to_owned()]);
        }
        (best, why)
    }

    fn depth(&self, family: Family, context: &Context) -> (Level, Vec<String>) {
        use Cue::*;
        let cur = &self.cur_shape;
        let mut points = 0u32;
        let mut why = Vec::new();
        let hard = self.c(ReasonHard) + self.c(CodeHard) + self.c(MathHard);
        if hard > 0 {
            points += hard.min(3);
            why.push(format!("hard-task keywords: {hard}"));
        }
        if self.c(Reason) >= 2 {
            points += 1;
            why.push(format!("analysis keywords: {}", self.c(Reason)));
        }
        let steps = self.c(Step);
        if steps >= 2 || (steps >= 1 && hard > 0) {
            points += 1;
            why.push(format!("multi-part ask: {steps} sequencing words"));
        }
        let constraints = self.constraints();
        if constraints >= 3 {
            points += 1 + u32::from(constraints >= 6);
            why.push(format!("numbered constraints: {constraints}"));
        }
        if cur.questions >= 3 {
            points += 1;
            why.push(format!("questions: {}", cur.questions));
        }
        let code_lines = cur.code_lines() + self.sys_shape.code_lines();
        if code_lines >= 80 {
            points += 1 + u32::from(code_lines >= 250);
            why.push(format!("code lines: {code_lines}"));
        }
        let traces = self.any(Trace) + cur.frames;
        if traces > 0 && code_lines >= 10 {
            points += 1;
            why.push("stack trace with code".to_owned());
        }
        if cur.prose >= 1200 && self.documents == 0 {
            points += 1;
            why.push(format!("long request: {} bytes", cur.prose));
        }
        if context.documents > 0 && context.tokens >= 6000 {
            points += 1;
            why.push(format!("long documents: {} tokens", context.tokens));
        }
        if self.tools_defined >= 8 && (self.tool_forced || self.tool_rounds >= 2) {
            points += 1;
            why.push(format!(
                "agent loop: {} tools, {} rounds",
                self.tools_defined, self.tool_rounds
            ));
        }
        if matches!(
            family,
            Family::Chat | Family::Classification | Family::Translation
        ) {
            points = points.saturating_sub(1);
        }
        let level = match points {
            0 => Level::Low,
            1 | 2 => Level::Medium,
            _ => Level::High,
        };
        if why.is_empty() {
            why.push("no depth cue".to_owned());
        }
        (level, why)
    }

    /// Numbered items of the ask itself (not of a pasted document or code).
    fn constraints(&self) -> u32 {
        let cur = &self.cur_shape;
        if cur.fences == 0 && cur.prose < 3000 {
            cur.numbered
        } else {
            0
        }
    }

    fn precision(&self, family: Family) -> (Level, Vec<String>) {
        use Cue::*;
        let mut why = Vec::new();
        let mut points = 0;
        let precise = self.c(Precise) + self.body.n(Precise) / 2;
        if precise > 0 {
            points += 1 + 2 * u32::from(precise >= 3);
            why.push(format!("keyword: {}", self.word(Precise)));
        }
        if self.c(MathHard) > 0 || self.any(Latex) >= 3 {
            points += 2;
            why.push("proof or heavy notation".to_owned());
        }
        if let Format::Schema { properties, .. } = self.format {
            points += 1;
            why.push(format!("json schema: {properties} properties"));
        }
        if self.temperature.is_some_and(|t| t <= 0.1) {
            points += 1;
            why.push("temperature <= 0.1".to_owned());
        }
        if matches!(family, Family::Math | Family::Extraction) {
            points += 1;
            why.push(format!("family: {}", family.as_str()));
        }
        let mut level = match points {
            0 => Level::Medium,
            1 | 2 => Level::Medium,
            _ => Level::High,
        };
        if points == 0 && (family == Family::Creative || self.temperature.is_some_and(|t| t >= 1.0))
        {
            level = Level::Low;
            why.push("creative or high temperature".to_owned());
        } else if points == 0 && family == Family::Chat {
            level = Level::Low;
            why.push("small talk".to_owned());
        }
        if why.is_empty() {
            why.push("no precision cue".to_owned());
        }
        (level, why)
    }

    fn output(&self, family: Family) -> Dim<Output> {
        use Cue::*;
        match self.format {
            Format::Schema {
                properties, depth, ..
            } => {
                return Dim::new(
                    Output::JsonSchema,
                    vec![
                        "response_format: json_schema".to_owned(),
                        format!("schema: {properties} properties, depth {depth}"),
                    ],
                )
            }
            Format::Json => {
                return Dim::new(
                    Output::Json,
                    vec!["response_format: json_object".to_owned()],
                )
            }
            Format::Text => {}
        }
        if family == Family::Code && self.c(CodeWrite) > 0 {
            return Dim::new(
                Output::Code,
                vec![format!("keyword: {}", self.word(CodeWrite))],
            );
        }
        if self.c(JsonAsk) > 0 || self.cur.has(Cue::JsonAsk) {
            return Dim::new(Output::Json, vec![format!("asks: {}", self.word(JsonAsk))]);
        }
        Dim::new(Output::FreeText, vec!["no format asked".to_owned()])
    }

    fn security(&self) -> (Security, Vec<String>) {
        let s = self.sensitive;
        let named = |bits: u8, names: &[&str]| -> Vec<String> {
            (0..names.len())
                .filter(|i| bits & (1 << i) != 0)
                .map(|i| names[i].to_owned())
                .collect()
        };
        if s.secrets != 0 {
            let mut why: Vec<String> = named(s.secrets, &SECRET_KINDS)
                .into_iter()
                .map(|n| format!("secret: {n}"))
                .collect();
            why.extend(
                named(s.pii, &PII_KINDS)
                    .into_iter()
                    .map(|n| format!("pii: {n}")),
            );
            return (Security::Secrets, why);
        }
        let mut pii = s.pii;
        if s.pii_word > 0 {
            pii |= 1 << 4;
        }
        if pii != 0 {
            let mut why: Vec<String> = named(pii, &PII_KINDS)
                .into_iter()
                .map(|n| format!("pii: {n}"))
                .collect();
            if s.pii_word > 0 {
                let w = match self.cur.word(Cue::PiiWord) {
                    "" => self.hist.word(Cue::PiiWord),
                    w => w,
                };
                let w = if w.is_empty() {
                    self.sys.word(Cue::PiiWord)
                } else {
                    w
                };
                why.push(format!("keyword: {w}"));
            }
            return (Security::Pii, why);
        }
        (
            Security::Public,
            vec!["no secret or personal-data marker".to_owned()],
        )
    }

    /// `paid` when a free model (Llama 3.3 70B, gpt-oss-120b, Gemini Flash class) would likely
    /// under-serve the request; mode and budgets are the router's to weigh, not this.
    fn tier(
        &self,
        family: Family,
        depth: Level,
        precision: Level,
        context: &Context,
        tools: &Tools,
    ) -> (Tier, Vec<String>) {
        use Cue::*;
        let cur = &self.cur_shape;
        let code_lines =
            cur.code_lines() + self.sys_shape.code_lines() + self.hist_shape.code_lines() / 2;
        let traces = self.any(Trace) + cur.frames;
        let mut why = Vec::new();
        match family {
            Family::Code => {
                if self.c(CodeHard) > 0 && (code_lines >= 60 || depth == Level::High || traces > 0)
                {
                    why.push(format!(
                        "hard code: {} with {code_lines} code lines",
                        self.word(CodeHard)
                    ));
                }
                // A multi-frame trace beside the code it crosses, or any error beside a lot of
                // code: debugging across call sites (a one-line error on a snippet is not).
                if (cur.frames >= 2 && code_lines >= 6) || (traces > 0 && code_lines >= 15) {
                    why.push(format!(
                        "debugging: stack trace ({} frames) and {code_lines} code lines",
                        cur.frames
                    ));
                }
                if code_lines >= 300 {
                    why.push(format!("large code: {code_lines} lines"));
                }
                if self.c(CodeHard) >= 2 && depth >= Level::Medium {
                    why.push(format!("design: {}", self.word(CodeHard)));
                }
            }
            Family::Math => {
                if self.c(MathHard) > 0 && (depth >= Level::Medium || self.any(Latex) > 0) {
                    why.push(format!("proof-grade math: {}", self.word(MathHard)));
                } else if self.c(ReasonHard) > 0 && (depth >= Level::Medium || self.any(Latex) > 0)
                {
                    why.push(format!("rigorous derivation: {}", self.word(ReasonHard)));
                }
                if self.any(Latex) >= 3 && precision == Level::High {
                    why.push("heavy notation, high precision".to_owned());
                }
            }
            Family::Reasoning if depth == Level::High => {
                why.push("deep multi-step reasoning".to_owned());
            }
            Family::Extraction => match self.format {
                Format::Schema {
                    properties,
                    depth: d,
                    ..
                } if (properties >= 20 || d >= 4) && context.tokens >= 1500 => {
                    why.push(format!(
                        "complex schema ({properties} properties, depth {d}) over a long text"
                    ));
                }
                _ => {}
            },
            _ => {}
        }
        if context.documents > 0
            && context.tokens >= 3000
            && precision == Level::High
            && family != Family::Translation
        {
            why.push(format!(
                "long documents ({} tokens), high precision",
                context.tokens
            ));
        }
        if tools.defined >= 8 && (tools.forced || self.tool_rounds >= 2) && depth >= Level::Medium {
            why.push(format!("complex agent loop: {} tools", tools.defined));
        }
        if why.is_empty()
            && depth == Level::High
            && precision == Level::High
            && family != Family::Translation
        {
            why.push("deep and high-precision".to_owned());
        }
        if why.is_empty() {
            (Tier::Free, vec!["no hard-task feature".to_owned()])
        } else {
            (Tier::Paid, why)
        }
    }
}

fn economic_reasons(e: &Economic) -> Vec<String> {
    let mut why = vec![
        format!("mode: {}", e.mode),
        format!("budget: {:?}", e.budget).to_lowercase(),
    ];
    if let Some(p) = e.policy_mode {
        why.push(format!("policy mode: {p}"));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> ChatRequest {
        ChatRequest::parse(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    fn user(text: &str) -> Profile {
        Profile::of(
            &req(json!({"model": "auto", "messages": [{"role": "user", "content": text}]})),
            Economic::default(),
        )
    }

    const HISTORY: &str = "USER: How do I make a sourdough starter?\nASSISTANT: Mix equal parts flour and water, feed daily for a week.";

    /// OpenWebUI's task templates (backend/open_webui/config.py), the history filled in as
    /// OpenWebUI renders `{{MESSAGES:END:n}}`.
    fn openwebui(task: &str) -> String {
        let t = match task {
            "title" => "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n### Guidelines:\n- The title should clearly represent the main theme or subject of the conversation.\n### Output:\nJSON format: { \"title\": \"your concise title here\" }\n### Examples:\n- { \"title\": \"📉 Stock Market Trends\" },\n### Chat History:\n<chat_history>\nH\n</chat_history>",
            "tags" => "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more specific subtopic tags.\n\n### Guidelines:\n- Start with high-level domains (e.g. Science, Technology, Philosophy, Arts, Politics, Business, Health, Sports, Entertainment, Education)\n\n### Output:\nJSON format: { \"tags\": [\"tag1\", \"tag2\", \"tag3\"] }\n\n### Chat History:\n<chat_history>\nH\n</chat_history>",
            "follow_ups" => "### Task:\nSuggest 3-5 relevant follow-up questions or prompts that the user might naturally ask next in this conversation as a **user**, based on the chat history, to help continue or deepen the discussion.\n### Output:\nJSON format: { \"follow_ups\": [\"Question 1?\", \"Question 2?\", \"Question 3?\"] }\n### Chat History:\n<chat_history>\nH\n</chat_history>",
            "queries" => "### Task:\nAnalyze the chat history to determine the necessity of generating search queries, in the given language.\n### Guidelines:\n- Respond **EXCLUSIVELY** with a JSON object.\n- When generating search queries, respond in the format: { \"queries\": [\"query1\", \"query2\"] }\n- Today's date is: 2026-11-02.\n### Output:\nStrictly return in JSON format: \n{\n  \"queries\": [\"query1\", \"query2\"]\n}\n\n### Chat History:\n<chat_history>\nH\n</chat_history>\n",
            "autocomplete" => "### Task:\nYou are an autocompletion system. Continue the text in `<text>` based on the **completion type** in `<type>` and the given language.\n### **Output Rules**:\n- Respond only in JSON format: `{ \"text\": \"<your_completion>\" }`.\n---\n### Context:\n<chat_history>\nH\n</chat_history>\n<type>search query</type>  \n<text>best sourdough flour for</text>  \n#### Output:\n",
            "emoji" => "Your task is to reflect the speaker's likely facial expression through a fitting emoji. Interpret emotions from the message and reflect their facial expression using fitting, diverse emojis (e.g., 😊, 😢, 😡, 😱).\n\nMessage: ```I finally passed my driving test!```",
            _ => unreachable!(),
        };
        t.replace("\nH\n", &format!("\n{HISTORY}\n"))
    }

    #[test]
    fn openwebui_background_templates() {
        for (task, kind) in [
            ("title", Background::Title),
            ("tags", Background::Tags),
            ("follow_ups", Background::FollowUps),
            ("queries", Background::QueryGeneration),
            ("autocomplete", Background::Autocomplete),
            ("emoji", Background::Other),
        ] {
            let p = user(&openwebui(task));
            assert_eq!(p.family.value, Family::Background, "{task}: {:?}", p.family);
            assert_eq!(p.background, Some(kind), "{task}");
            assert_eq!(p.tier.value, Tier::Free, "{task}");
            assert!(p.is_background());
            let want = if kind == Background::Autocomplete {
                Latency::Interactive
            } else {
                Latency::Background
            };
            assert_eq!(p.latency.value, want, "{task}");
            assert!(!p.family.reasons.is_empty());
        }
        let p = user(&openwebui("title"));
        assert!(
            p.family
                .reasons
                .iter()
                .any(|r| r == "openwebui template: <chat_history>"),
            "{:?}",
            p.family.reasons
        );
        assert_eq!(p.output.value, Output::Json);
    }

    #[test]
    fn keys_inside_the_history_do_not_change_the_chore() {
        let history = "USER: return { \"tags\": [\"a\"] } from my API\nASSISTANT: sure";
        let t = openwebui("title").replace(HISTORY, history);
        assert_eq!(user(&t).background, Some(Background::Title));
    }

    #[test]
    fn continue_title_and_fim() {
        let title = "Given the following... please reply with a title for the chat that is 3-4 words in length, all words used should be directly related to the content of the chat, avoid using verbs unless they are directly related to the content of the chat, no additional text or explanation, you don't need ending punctuation.\n\nHow do I memoize a React hook?";
        let p = Profile::of(
            &req(
                json!({"model": "gpt-4.1", "max_tokens": 16, "messages": [{"role": "user", "content": title}]}),
            ),
            Economic::default(),
        );
        assert_eq!(p.background, Some(Background::Title));
        assert!(p.family.reasons.iter().any(|r| r == "max_tokens: 16"));
        for fim in [
            "<fim_prefix>def add(a, b):\n    <fim_suffix>\n<fim_middle>",
            "<|fim_prefix|>fn main() {\n    let x = <|fim_suffix|>;\n}<|fim_middle|>",
        ] {
            let p = user(fim);
            assert_eq!(p.background, Some(Background::Autocomplete));
            assert_eq!(p.output.value, Output::Code);
            assert!(p.family.reasons[0].starts_with("fim marker"));
        }
    }

    #[test]
    fn memory_chore() {
        let t = "Progressively summarize the lines of conversation provided, adding onto the previous summary returning a new summary.\n\nCurrent summary:\nThe human asks about Rust.\n\nNew lines of conversation:\nHuman: and lifetimes?\nAI: They bound references.\n\nNew summary:";
        let p = user(t);
        assert_eq!(p.background, Some(Background::Other));
    }

    fn family(text: &str) -> Family {
        user(text).family.value
    }

    #[test]
    fn each_family() {
        assert_eq!(family("hey, how are you doing today?"), Family::Chat);
        assert_eq!(family("Write a Python function that merges two sorted lists.\n```python\ndef merge(a, b):\n    pass\n```"), Family::Code);
        assert_eq!(
            family("Solve the equation 3x^2 - 12 = 0 and calculate both roots."),
            Family::Math
        );
        assert_eq!(family("Extract the invoice number, dates and amounts from this text: Invoice 42, 2026-01-03, 120 EUR"), Family::Extraction);
        assert_eq!(family("Summarize this article in three bullet points: The council voted on Tuesday to expand the bike lanes."), Family::Summarisation);
        assert_eq!(
            family("Traduis en anglais : « Le chat dort sur le canapé. »"),
            Family::Translation
        );
        assert_eq!(
            family("Write a short poem about autumn leaves and a lost umbrella."),
            Family::Creative
        );
        assert_eq!(
            family(
                "Compare the trade-offs of renting versus buying a flat, and reason step by step."
            ),
            Family::Reasoning
        );
        assert_eq!(family("Classify the sentiment of this review as positive or negative: 'The battery died in a day.'"), Family::Classification);
        let tools: Vec<Value> = (0..3)
            .map(|i| json!({"type": "function", "function": {"name": format!("t{i}"), "parameters": {"type": "object"}}}))
            .collect();
        let p = Profile::of(
            &req(
                json!({"model": "auto", "tools": tools, "tool_choice": "required", "messages": [{"role": "user", "content": "What's the weather in Lyon?"}]}),
            ),
            Economic::default(),
        );
        assert_eq!(p.family.value, Family::ToolUse);
        assert!(p.tools.value.forced && p.tools.value.defined == 3);
        assert!(p
            .tools
            .reasons
            .iter()
            .any(|r| r == "tool_choice forces a call"));
    }

    #[test]
    fn cjk_translation() {
        let p = user("Translate into English: 今日はとても良い天気ですね。散歩に行きましょう。");
        assert_eq!(p.family.value, Family::Translation);
        assert!(p
            .context
            .reasons
            .iter()
            .any(|r| r.starts_with("cjk characters")));
        assert_eq!(
            family("请把这句话翻译成英语：我明天去北京开会。"),
            Family::Translation
        );
    }

    #[test]
    fn secrets_and_pii() {
        let p = user(
            "my config: OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz123456 why does it fail?",
        );
        assert_eq!(p.security.value, Security::Secrets);
        assert!(
            p.security.reasons.iter().any(|r| r == "secret: api key"),
            "{:?}",
            p.security.reasons
        );
        let p = user(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        );
        assert_eq!(p.security.value, Security::Secrets);
        let p = user("db password: hunter2hunter2 in prod");
        assert_eq!(p.security.value, Security::Secrets);
        assert_eq!(
            user("password = os.environ['PW']").security.value,
            Security::Public
        );
        let p = user("Write to jane.doe@example.com or call +33 6 12 34 56 78.");
        assert_eq!(p.security.value, Security::Pii);
        assert!(p
            .security
            .reasons
            .contains(&"pii: e-mail address".to_owned()));
        assert!(p.security.reasons.contains(&"pii: phone number".to_owned()));
        assert_eq!(
            user("card 4111 1111 1111 1111 was declined").security.value,
            Security::Pii
        );
        assert_eq!(
            user("IBAN FR76 3000 6000 0112 3456 7890 189")
                .security
                .value,
            Security::Pii
        );
        assert_eq!(
            user("version 1.2.3 released on 2026-01-02").security.value,
            Security::Public
        );
    }

    #[test]
    fn json_schema_and_code_output() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "address": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let p = Profile::of(
            &req(
                json!({"model": "auto", "temperature": 0, "seed": 7, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                "messages": [{"role": "user", "content": "Extract the person from: Ana lives in Porto."}]}),
            ),
            Economic::default(),
        );
        assert_eq!(p.output.value, Output::JsonSchema);
        assert!(
            p.output
                .reasons
                .iter()
                .any(|r| r == "schema: 3 properties, depth 2"),
            "{:?}",
            p.output.reasons
        );
        assert!(p.determinism.value.json && p.determinism.value.seed);
        assert_eq!(p.determinism.value.temperature, Some(0.0));
        assert!(p
            .determinism
            .reasons
            .contains(&"response_format: json_schema".to_owned()));
        let p = user("Implement a Rust function `fn median(v: &mut [i32]) -> f64`; code only.");
        assert_eq!(p.family.value, Family::Code);
        assert_eq!(p.output.value, Output::Code);
    }

    #[test]
    fn every_dimension_says_why() {
        let p = Profile::of(
            &req(json!({"model": "auto", "stream": true, "messages": [
                {"role": "system", "content": "You are a senior engineer."},
                {"role": "user", "content": "Refactor this module to remove the global state.\n```rust\nstatic mut X: i32 = 0;\nfn f() { unsafe { X += 1; } }\n```"}]})),
            Economic {
                mode: "free",
                ..Economic::default()
            },
        );
        for (name, reasons) in [
            ("family", &p.family.reasons),
            ("depth", &p.depth.reasons),
            ("precision", &p.precision.reasons),
            ("latency", &p.latency.reasons),
            ("context", &p.context.reasons),
            ("tools", &vec!["-".to_owned()]),
            ("security", &p.security.reasons),
            ("output", &p.output.reasons),
            ("economic", &p.economic.reasons),
            ("tier", &p.tier.reasons),
        ] {
            assert!(!reasons.is_empty(), "{name}");
        }
        assert!(
            p.family.reasons.iter().any(|r| r == "keyword: refactor"),
            "{:?}",
            p.family.reasons
        );
        assert!(p.context.reasons.iter().any(|r| r == "code fences: 2"));
        assert_eq!(p.latency.value, Latency::Interactive);
        assert_eq!(p.economic.value.mode, "free");
        assert!(p.economic.reasons.contains(&"mode: free".to_owned()));
        assert_eq!(p.context.value.turns, 1);
        assert_eq!(p.context.value.code_blocks, 1);
    }

    #[test]
    fn hard_work_is_paid_and_easy_work_free() {
        let mut code = String::from("Here is the stack trace and the code; find the root cause.\n```\nTraceback (most recent call last):\n  File \"app.py\", line 12, in <module>\nKeyError: 'id'\n```\n```python\n");
        for i in 0..40 {
            code.push_str(&format!("def f{i}(x):\n    return x['id'] + {i}\n"));
        }
        code.push_str("```");
        assert_eq!(user(&code).tier.value, Tier::Paid);
        let p = user("Prove that there are infinitely many primes, rigorously, and show that the product of the first n primes plus one has a prime factor not among them.");
        assert_eq!(p.family.value, Family::Math);
        assert_eq!(p.tier.value, Tier::Paid, "{:?}", p.tier);
        assert_eq!(user("What is 15% of 80?").tier.value, Tier::Free);
        assert_eq!(user("Write a haiku about the sea").tier.value, Tier::Free);
    }

    #[test]
    fn tokens_follow_the_quota_estimate() {
        let body = json!({"model": "auto", "messages": [{"role": "user", "content": "hello there, how are you?"}]});
        let bytes = serde_json::to_vec(&body).unwrap();
        let p = Profile::of(&req(body), Economic::default());
        assert_eq!(
            u64::from(p.context.value.tokens),
            crate::quota::estimate_prompt_tokens(bytes.len())
        );
    }

    /// The cues a scan of `text` finds, with the lexicon word that first set each.
    fn cues(text: &str) -> Vec<(Cue, &'static str)> {
        let (mut hits, mut sensitive) = (Hits::default(), Sensitive::default());
        scan(text.as_bytes(), 0, &mut hits, &mut sensitive);
        (0..CUES)
            .filter(|&c| hits.n[c] > 0)
            .map(|c| {
                let cue = PATTERNS[usize::from(hits.first[c]) - 1].cue;
                (cue, hits.word(cue))
            })
            .collect()
    }

    #[test]
    fn the_index_finds_every_pattern() {
        for (i, p) in PATTERNS.iter().enumerate() {
            let text = String::from_utf8(p.bytes.to_vec()).unwrap();
            for t in [
                text.clone(),
                text.to_ascii_uppercase(),
                format!("{text} tail"),
            ] {
                let (found, end) = longest_at(t.as_bytes(), 0).unwrap_or_else(|| panic!("{t:?}"));
                assert_eq!(end, p.bytes.len(), "{t:?}");
                // Itself, or an earlier pattern with the same bytes (`react`).
                assert!(found <= i, "{t:?}");
                assert!(PATTERNS[found].bytes.eq_ignore_ascii_case(p.bytes), "{t:?}");
            }
        }
    }

    #[test]
    fn lexicon_matching() {
        use Cue::*;
        // Word boundaries, stems, the longest match and no overlap.
        assert_eq!(cues("please classify these"), vec![(Classify, "classify")]);
        assert_eq!(cues("reclassify these"), vec![]);
        assert_eq!(cues("Summarising it"), vec![(Summarise, "summaris")]);
        assert_eq!(cues("the classes"), vec![]);
        assert_eq!(
            cues("Write a function"),
            vec![(CodeWrite, "write a function")]
        );
        assert_eq!(cues("in React"), vec![(Code, "react")]);
        assert_eq!(cues("in_depth"), vec![]);
        // Patterns that need no boundary before them: symbols, notation, other scripts.
        assert_eq!(cues("∀x∈S"), vec![(Latex, "∀")]);
        assert_eq!(cues("f(x)=3x^2"), vec![(Math, "^2")]);
        assert_eq!(cues("请翻译这句话"), vec![(Translate, "翻译")]);
        assert_eq!(cues("Übersetze das"), vec![(Translate, "Übersetz")]);
        assert_eq!(
            cues("#### Output: {\"text\": 1}"),
            vec![(KeyText, "{\"text\"")]
        );
        // Prose cues inside a fence do not count; a fence is a line's first non-blank bytes.
        assert_eq!(cues("```\nsolve(x)\n```"), vec![]);
        assert_eq!(cues("a ```solve``` b"), vec![(Math, "solve")]);
        assert_eq!(cues("tail"), vec![]);
        assert_eq!(cues("x"), vec![]);
        assert_eq!(cues(""), vec![]);
    }

    #[test]
    fn eight_bytes_at_once() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for v in 0..=255u8 {
            for at in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut bytes = x.to_le_bytes();
                bytes[at] = v;
                let folded = fold8(u64::from_le_bytes(bytes)).to_le_bytes();
                assert_eq!(folded, bytes.map(|c| c.to_ascii_lowercase()), "{bytes:?}");
                let mut one = [b'a'; 8];
                one[at] = v;
                assert_eq!(
                    digit_or_at(u64::from_le_bytes(one)),
                    (0x30..=0x40).contains(&v),
                    "{v:#x} at {at}"
                );
            }
        }
        let text: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        for n in 0..text.len() {
            let b = &text[..n];
            assert_eq!(
                count(b, |c| c > 200),
                b.iter().filter(|&&c| c > 200).count() as u32
            );
        }
        for (line, code) in [
            ("#include <stdio.h>", true),
            ("private fn", true),
            ("privat", false),
            ("def", false),
            ("def f(x):", true),
            ("<div>", true),
            ("de", false),
        ] {
            assert_eq!(
                code_start(line.as_bytes(), word8(line.as_bytes())),
                code,
                "{line}"
            );
        }
    }

    #[test]
    fn a_256_kb_message() {
        let mut text = String::with_capacity(270_000);
        let mut fences = 0;
        let mut paragraphs = 0;
        while text.len() < 256 * 1024 {
            text.push_str("The committee reviewed the quarterly figures and found no discrepancy in the ledger. ");
            paragraphs += 1;
            if paragraphs % 40 == 0 {
                text.push_str("\n```js\nconst x = compute(a, b);\n```\n");
                fences += 2;
            }
            text.push('\n');
        }
        text.push_str("\nSummarize the document above.");
        let body = json!({"model": "auto", "messages": [{"role": "user", "content": text}]});
        let bytes = serde_json::to_vec(&body).unwrap().len();
        let p = Profile::of(&req(body), Economic::default());
        // The whole message is counted, though the lexicons read only its head and tail.
        assert_eq!(
            u64::from(p.context.value.tokens),
            crate::quota::estimate_prompt_tokens(bytes)
        );
        assert_eq!(p.context.value.code_blocks, fences / 2);
        assert!(p.context.value.documents >= 1);
        assert_eq!(p.family.value, Family::Summarisation);
    }
}
