//! Spend limits in US dollars, per day and per month: for the whole gateway, per tenant (a client
//! key) and per end user of a tenant (the user OpenWebUI names in `X-OpenWebUI-User-Id` or
//! `X-OpenWebUI-User-Email`). Every priced answer's cost is added atomically to window-tagged
//! counters; a burn-rate EWMA predicts when each budget runs out; a spent budget refuses paid
//! routes with an OpenAI-shaped `insufficient_quota` error while free routes keep serving; and the
//! same linear prediction tells when a free tier's daily request quota runs out.
//!
//! # Tenants and end users
//!
//! A tenant is a client key, named `t` + the first 10 hex digits of the key's SHA-256 digest —
//! the digest the operator put in `client_keys`, so an operator names a tenant by the start of
//! its digest ([`Tenant::of`]). There is no anonymous tenant: with `client_keys` empty every
//! request is refused (`auth::check`), so every request that reaches routing has a key.
//!
//! An end user is `u` + the first 10 hex digits of the SHA-256 of the trimmed user id
//! (`printf %s "$id" | sha256sum | cut -c1-10`), or, without an id, of the trimmed, lower-cased
//! email. The raw id or email is never written anywhere. The names are pseudonyms, not
//! anonymity: whoever holds a list of candidate emails can hash them and compare. The headers are
//! set by the client: a user budget constrains OpenWebUI's users (who cannot set headers), not
//! whoever holds the client key — the tenant's budget is what bounds a key.
//!
//! # Variables ([`VARIABLES`])
//!
//! Amounts are US dollars as plain decimals (`5`, `12.50`, `0.000001`): at most 6 decimal places,
//! because money is counted in micro-dollars, and a limit with a seventh decimal is refused
//! rather than silently rounded (a limit is a promise; the operator should see it is not
//! representable). Parsed from the decimal string, never through `f64`. At most $10,000,000 (the
//! counters hold $70 million per window). Absent or empty: no limit. `0`: paid models are off.
//!
//! - `budget_daily_usd`, `budget_monthly_usd`: the whole gateway.
//! - `tenant_budget_daily_usd`, `tenant_budget_monthly_usd`: each tenant, unless overridden.
//! - `user_budget_daily_usd`, `user_budget_monthly_usd`: each end user of each tenant, unless
//!   overridden. Requests without a user header count against the tenant only.
//! - `tenant_budgets`: overrides, entries separated by `;` (or new lines), each
//!   `<scope>=<period>:<amount>[,<period>:<amount>]`, e.g.
//!   `t1a2b3c4d5e=daily:5,monthly:50; t9f8e7d6c5b=monthly:200; t9f8e7d6c5b:u0123456789=daily:none`.
//!   `<scope>` is a tenant id or `<tenant>:<user>`; `<period>` is `daily` or `monthly`; `<amount>`
//!   is USD or `none` (no limit). A period an entry does not name keeps the default. Parsed
//!   strictly: an error names the entry (number and text) and what was expected.
//! - `budget_lean_free_at`: the fraction of a budget left below which `auto` leans free
//!   (default `0.25`; `0` to lean only on a predicted run-out).
//!
//! Days and months are UTC. The gateway's own day and month counters (scope `global`) are always
//! kept for paid answers, and the global EWMA too, limit or not: the state endpoint and the
//! dashboard show what the gateway spends, so a global limit set in mid-month counts the month's
//! spend so far. A tenant or an end user is counted only where a limit applies to it in some
//! period (both periods, since the prediction needs the day's counter): a deployment without
//! tenant or user budgets writes nothing per tenant or user, and such a limit set in mid-month
//! counts from then on.
//!
//! # Money
//!
//! [`micro_usd`] turns a price (USD per million tokens, which is micro-dollars per token) and a
//! usage into whole micro-dollars: prices are taken to 6 decimals as integers (exact for every
//! catalogue price), the product is summed in integers, and the request's fraction of a
//! micro-dollar is rounded **up, once per request**. So a request is counted at most 1 µ$ above
//! its exact price, never below, and the `x-freerelay-cost-usd` header ([`format_usd`]: the same
//! integer / 10⁶ with 6 decimals) sums exactly to the recorded spend. An unknown price (a paid
//! model the catalogue does not price, a custom provider without `custom_price_*`) is `None`:
//! nothing is counted for it.
//!
//! # Keys ([`keys::budget`])
//!
//! Per scope (`global`, `<tenant>`, `<tenant>:<user>`): `budget:v1:<scope>:day` and
//! `budget:v1:<scope>:month`, [`counter::MONEY`] window-tagged counters (`window × 2^46 +
//! micro-dollars`; the window is the UTC day index, or `year × 12 + month − 1`), and
//! `budget:v1:<scope>:ewma`, JSON [`Ewma`].
//!
//! # Prediction
//!
//! Two exponentially weighted moving averages of the burn rate (µ$ per second), over irregular
//! intervals: `rate ← rate + α (spent/Δt − rate)` with `α = 1 − exp(−Δt/τ)`.
//!
//! - `rate`, τ = 1 hour, predicts the **daily** budgets. An hour reacts within minutes to a
//!   runaway (a loop spending $1 a minute moves it to $4.80 an hour in 5 minutes, enough to
//!   predict a $5 day's end), while one expensive answer moves it by only its cost / τ (a $0.10
//!   answer: $0.10 an hour), not by its cost over a minute as a short window would.
//! - `slow_rate`, τ = 1 day, predicts the **monthly** budgets. An hour's pace extrapolated over
//!   weeks is noise: working-hours traffic would "run out" every month every morning. A day's
//!   memory damps the day-night cycle to about a sixth of its swing (office-hours traffic stays
//!   within about ±25% of the daily mean).
//!
//! Both start at 0 for a new scope and warm up over τ (towards not leaning early; the hard cap
//! stays exact). A budget is predicted to run out at `now + remaining / rate` when that is before
//! its reset, else not at all. The prediction assumes the recent pace continues: a team that works
//! 9 to 5 close to its daily budget sees a run-out predicted in the afternoon, which is the point
//! ("`auto` leans free as a budget thins").
//!
//! The fold is lazy: when spend is recorded and at least 60 s have passed since the record's
//! `at_ms`, one compare-and-swap folds everything spent since (the day counter's total minus
//! `day_total_at`) into both rates — one CAS per scope per minute at most, whatever the traffic;
//! folding more often would not change the result (α·spent/Δt ≈ spent/τ for small Δt). Whether
//! a fold is due is judged from the record the request read at its start (no extra read). Readers
//! fold the same way without writing ([`Health::read`]), so an idle scope's rate decays with time
//! instead of staying at its last value. On a new UTC day, the spend since the last fold is the
//! new day's total (the few seconds before midnight are lost to the rate, never to the counters).
//!
//! # Hard cap
//!
//! [`Health::refusal`]: any applicable budget (global, the tenant's, the user's) whose spend is at
//! or over its limit refuses paid routes, with [`ApiError::budget_exhausted`] naming the budget
//! that resets last and when. The check happens before the request and the cost is known only
//! after it, so requests already admitted finish and spend can pass a limit by what they cost.
//!
//! # JSON (`GET /v1/freerelay/state`)
//!
//! [`Health`]:
//!
//! ```json
//! {"lean_free_at": 0.25, "lean_free": true,
//!  "budgets": [{"scope": "global", "level": "global", "period": "day",
//!    "limit_micro_usd": null, "spent_micro_usd": 12300000, "remaining_micro_usd": null,
//!    "fraction_left": null, "exhausted": false,
//!    "resets_at_ms": 1795651200000, "resets_at": "2026-11-26T00:00:00Z",
//!    "rate_micro_usd_per_s": 120.5, "predicted_runout_ms": null},
//!   {"scope": "global", "level": "global", "period": "month", …},
//!   {"scope": "t1a2b3c4d5e", "level": "tenant", "period": "day",
//!    "limit_micro_usd": 5000000, "spent_micro_usd": 4100000, "remaining_micro_usd": 900000,
//!    "fraction_left": 0.18, "exhausted": false,
//!    "resets_at_ms": 1795651200000, "resets_at": "2026-11-26T00:00:00Z",
//!    "rate_micro_usd_per_s": 41.7, "predicted_runout_ms": 1795621600000}]}
//! ```
//!
//! `budgets` lists the counted scopes broadest first, a day and a month each: always the gateway
//! (`global`), then the tenant and its user where a limit applies to them. `level` is `global`,
//! `tenant` or `user`; `period` is `day` or `month`; `limit_micro_usd`, `remaining_micro_usd` and
//! `fraction_left` are `null` for a period without a limit (the global scope's without global
//! budgets, or a scope's that has a limit only in the other period): such a period only reports
//! spend and rate, never leans free nor refuses; `predicted_runout_ms` is `null` when the budget
//! has no limit, will not run out before it resets at the current pace, or is already spent
//! (`exhausted`).
//!
//! [`QuotaForecast`] (per provider key ledger with a daily request limit):
//! `{"used": 40, "limit": 50, "resets_at_ms": 1795651200000, "predicted_runout_ms": null}`.

use crate::catalog::{Price, Reset};
use crate::counter::{self, Windowed, MONEY};
use crate::error::ApiError;
use crate::kv::{cas_update, keys, Kv, KvResult};
use crate::quota::{civil_from_days, day_index, days_from_civil, next_reset_ms};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const BUDGET_DAILY_USD: &str = "budget_daily_usd";
pub const BUDGET_MONTHLY_USD: &str = "budget_monthly_usd";
pub const TENANT_BUDGET_DAILY_USD: &str = "tenant_budget_daily_usd";
pub const TENANT_BUDGET_MONTHLY_USD: &str = "tenant_budget_monthly_usd";
pub const USER_BUDGET_DAILY_USD: &str = "user_budget_daily_usd";
pub const USER_BUDGET_MONTHLY_USD: &str = "user_budget_monthly_usd";
pub const TENANT_BUDGETS: &str = "tenant_budgets";
pub const BUDGET_LEAN_FREE_AT: &str = "budget_lean_free_at";

/// Every budget variable (for the manifest and the component's variable list).
pub const VARIABLES: &[&str] = &[
    BUDGET_DAILY_USD,
    BUDGET_MONTHLY_USD,
    TENANT_BUDGET_DAILY_USD,
    TENANT_BUDGET_MONTHLY_USD,
    USER_BUDGET_DAILY_USD,
    USER_BUDGET_MONTHLY_USD,
    TENANT_BUDGETS,
    BUDGET_LEAN_FREE_AT,
];

/// `budget_lean_free_at` when unset.
pub const DEFAULT_LEAN_FREE_AT: f64 = 0.25;
/// The largest limit accepted, in micro-dollars ($10 million; a window's counter holds 2^46).
pub const MAX_LIMIT_MICRO: u64 = 10_000_000 * MICRO;
/// Micro-dollars per dollar.
pub const MICRO: u64 = 1_000_000;

/// At least this long between two folds of a scope's EWMA.
pub const FOLD_EVERY_MS: u64 = 60_000;
/// The time constant of the fast rate, which predicts daily budgets (seconds).
pub const TAU_FAST_S: f64 = 3_600.0;
/// The time constant of the slow rate, which predicts monthly budgets (seconds).
pub const TAU_SLOW_S: f64 = 86_400.0;

const DAY_MS: u64 = 86_400_000;

// ---------------------------------------------------------------------------------------------
// Tenants.

/// Who a request's spend is counted against: a client key and, where the client names one, an
/// end user. Both are pseudonyms (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant {
    /// `t` + 10 hex digits of the client key's SHA-256 digest.
    pub id: String,
    /// `u` + 10 hex digits of the SHA-256 of the user id (or lower-cased email).
    pub user: Option<String>,
}

impl Tenant {
    /// The tenant of a client key, by the key's digest (what `auth::check` returns), with the end user
    /// from `X-OpenWebUI-User-Id` (preferred) or `X-OpenWebUI-User-Email`; blank headers count
    /// as absent.
    pub fn of(
        client_key_digest_hex: &str,
        user_id: Option<&str>,
        user_email: Option<&str>,
    ) -> Self {
        let digest = client_key_digest_hex.trim().to_ascii_lowercase();
        let user = match (
            user_id.map(str::trim).filter(|s| !s.is_empty()),
            user_email.map(str::trim).filter(|s| !s.is_empty()),
        ) {
            (Some(id), _) => Some(pseudonym('u', id)),
            (None, Some(email)) => Some(pseudonym('u', &email.to_lowercase())),
            (None, None) => None,
        };
        Self {
            id: format!("t{}", digest.chars().take(10).collect::<String>()),
            user,
        }
    }

    /// The `<tenant>:<user>` scope, if there is a user.
    pub fn user_scope(&self) -> Option<String> {
        self.user.as_ref().map(|u| format!("{}:{u}", self.id))
    }
}

fn pseudonym(prefix: char, raw: &str) -> String {
    let digest = Sha256::digest(raw.as_bytes());
    let hex: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

// ---------------------------------------------------------------------------------------------
// Settings.

/// A day or a month (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub const ALL: [Period; 2] = [Period::Day, Period::Month];

    /// The key's last segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The word in variables and messages.
    pub fn adjective(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }

    /// The counter's window for `now_ms`: the UTC day index, or `year × 12 + month − 1`.
    pub fn window(self, now_ms: u64) -> u64 {
        let day = day_index(Reset::UtcMidnight, now_ms);
        match self {
            Period::Day => day,
            Period::Month => {
                let (y, m, _) = civil_from_days(day as i64);
                (y * 12 + i64::from(m) - 1).max(0) as u64
            }
        }
    }

    /// When the period containing `now_ms` ends (Unix ms): the next UTC midnight, or the first
    /// of the next month at 00:00 UTC.
    pub fn resets_at_ms(self, now_ms: u64) -> u64 {
        match self {
            Period::Day => next_reset_ms(Reset::UtcMidnight, now_ms),
            Period::Month => {
                let (y, m, _) = civil_from_days(day_index(Reset::UtcMidnight, now_ms) as i64);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1).max(0) as u64 * DAY_MS
            }
        }
    }
}

/// Limits of one scope in micro-dollars (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

impl Limits {
    pub fn of(&self, period: Period) -> Option<u64> {
        match period {
            Period::Day => self.daily,
            Period::Month => self.monthly,
        }
    }

    pub fn any(&self) -> bool {
        self.daily.is_some() || self.monthly.is_some()
    }

    fn with(self, o: &Override) -> Self {
        Self {
            daily: o.daily.unwrap_or(self.daily),
            monthly: o.monthly.unwrap_or(self.monthly),
        }
    }
}

/// One `tenant_budgets` entry: per period, `None` keeps the default, `Some(None)` lifts it,
/// `Some(Some(µ$))` replaces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Override {
    pub daily: Option<Option<u64>>,
    pub monthly: Option<Option<u64>>,
}

/// Which kind of scope a budget belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Global,
    Tenant,
    User,
}

/// The deployment's budgets (see the module doc for the variables).
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    pub global: Limits,
    /// Each tenant's default.
    pub tenant: Limits,
    /// Each end user's default.
    pub user: Limits,
    /// `tenant_budgets`, by scope (`t…` or `t…:u…`), in the order written.
    pub overrides: Vec<(String, Override)>,
    pub lean_free_at: f64,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            global: Limits::default(),
            tenant: Limits::default(),
            user: Limits::default(),
            overrides: Vec::new(),
            lean_free_at: DEFAULT_LEAN_FREE_AT,
        }
    }
}

impl Budgets {
    /// Reads and validates the budget variables. The error names the variable (and, for
    /// `tenant_budgets`, the entry) and what was expected; it is for the operator's log.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let usd = |name: &str| -> Result<Option<u64>, String> {
            match get(name).as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(v) => parse_usd(v)
                    .map(Some)
                    .map_err(|e| format!("variable `{name}` ({v:?}): {e}")),
            }
        };
        let lean_free_at = match get(BUDGET_LEAN_FREE_AT).as_deref().map(str::trim) {
            None | Some("") => DEFAULT_LEAN_FREE_AT,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| {
                    format!(
                        "variable `{BUDGET_LEAN_FREE_AT}` must be a fraction from 0 to 1 \
                         (e.g. 0.25), got {v:?}"
                    )
                })?,
        };
        Ok(Self {
            global: Limits {
                daily: usd(BUDGET_DAILY_USD)?,
                monthly: usd(BUDGET_MONTHLY_USD)?,
            },
            tenant: Limits {
                daily: usd(TENANT_BUDGET_DAILY_USD)?,
                monthly: usd(TENANT_BUDGET_MONTHLY_USD)?,
            },
            user: Limits {
                daily: usd(USER_BUDGET_DAILY_USD)?,
                monthly: usd(USER_BUDGET_MONTHLY_USD)?,
            },
            overrides: parse_overrides(&get(TENANT_BUDGETS).unwrap_or_default())?,
            lean_free_at,
        })
    }

    /// The limits of one scope: the default of its level with its override applied.
    pub fn limits(&self, level: Level, scope: &str) -> Limits {
        let default = match level {
            Level::Global => return self.global,
            Level::Tenant => self.tenant,
            Level::User => self.user,
        };
        match self.overrides.iter().find(|(s, _)| s == scope) {
            Some((_, o)) => default.with(o),
            None => default,
        }
    }

    /// The scopes a request of `tenant` counts in, broadest first: the gateway always (its
    /// spend is what the state endpoint and the dashboard show, limit or not), the tenant and
    /// its user where a limit applies to them.
    pub fn scopes(&self, tenant: &Tenant) -> Vec<(Level, String, Limits)> {
        let mut all = vec![
            (Level::Global, "global".to_owned()),
            (Level::Tenant, tenant.id.clone()),
        ];
        all.extend(tenant.user_scope().map(|s| (Level::User, s)));
        all.into_iter()
            .map(|(level, scope)| {
                let limits = self.limits(level, &scope);
                (level, scope, limits)
            })
            .filter(|(level, _, l)| *level == Level::Global || l.any())
            .collect()
    }
}

/// A USD amount as micro-dollars, from its decimal text: digits, optionally `.` and 1 to 6
/// digits; at most [`MAX_LIMIT_MICRO`]. No sign, exponent or currency symbol.
pub fn parse_usd(s: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected US dollars as a plain decimal such as `5` or `12.50`";
    let s = s.trim();
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (s.contains('.') && frac.is_empty()) {
        return Err(EXPECTED.into());
    }
    if frac.len() > 6 {
        return Err("more than 6 decimal places: budgets are counted in micro-dollars".into());
    }
    let too_large = || format!("more than the largest budget, ${}", MAX_LIMIT_MICRO / MICRO);
    let whole: u64 = int.parse().map_err(|_| too_large())?;
    let frac_micro: u64 = format!("{frac:0<6}").parse().unwrap_or(0);
    whole
        .checked_mul(MICRO)
        .and_then(|w| w.checked_add(frac_micro))
        .filter(|&m| m <= MAX_LIMIT_MICRO)
        .ok_or_else(too_large)
}

fn is_pseudonym(s: &str, prefix: char) -> bool {
    s.len() == 11 && s.starts_with(prefix) && s[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// `tenant_budgets` (see the module doc).
fn parse_overrides(text: &str) -> Result<Vec<(String, Override)>, String> {
    let mut out: Vec<(String, Override)> = Vec::new();
    let entries = text
        .split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty());
    for (i, entry) in entries.enumerate() {
        let at = format!("variable `{TENANT_BUDGETS}` entry #{} (`{entry}`)", i + 1);
        let Some((scope, spec)) = entry.split_once('=') else {
            return Err(format!(
                "{at}: expected `<tenant>=daily:<usd>,monthly:<usd>` \
                 (or `<tenant>:<user>=…`)"
            ));
        };
        let scope = scope.trim().to_ascii_lowercase();
        let valid = match scope.split_once(':') {
            None => is_pseudonym(&scope, 't'),
            Some((t, u)) => is_pseudonym(t, 't') && is_pseudonym(u, 'u'),
        };
        if !valid {
            return Err(format!(
                "{at}: `{scope}` is not a tenant (`t` + the first 10 hex digits of the client \
                 key's digest) nor `<tenant>:<user>` (`u` + 10 hex digits of the user id's \
                 SHA-256)"
            ));
        }
        if out.iter().any(|(s, _)| *s == scope) {
            return Err(format!(
                "{at}: `{scope}` is already set by an earlier entry"
            ));
        }
        let mut o = Override::default();
        for item in spec.split(',').map(str::trim) {
            let Some((period, amount)) = item.split_once(':') else {
                return Err(format!(
                    "{at}: expected `daily:<usd>` or `monthly:<usd>`, got `{item}`"
                ));
            };
            let slot = match period.trim() {
                "daily" => &mut o.daily,
                "monthly" => &mut o.monthly,
                other => {
                    return Err(format!(
                        "{at}: unknown period `{other}`, expected `daily` or `monthly`"
                    ))
                }
            };
            if slot.is_some() {
                return Err(format!("{at}: `{}` is given twice", period.trim()));
            }
            let amount = amount.trim();
            *slot = Some(if amount.eq_ignore_ascii_case("none") {
                None
            } else {
                Some(parse_usd(amount).map_err(|e| format!("{at}: `{amount}`: {e} or `none`"))?)
            });
        }
        out.push((scope, o));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Money.

/// The cost of a request in whole micro-dollars, rounded up once (see the module doc). `None`
/// when the price is unknown; a free tier's zero price costs 0.
pub fn micro_usd(price: Option<Price>, prompt_tokens: u64, completion_tokens: u64) -> Option<u64> {
    // USD per million tokens = micro-dollars per token; × 10^6 gives 10^-6 µ$ per token.
    let per_token = |usd_per_mtok: f64| -> u128 { (usd_per_mtok * 1e6).round().max(0.0) as u128 };
    price.map(|p| {
        let total = u128::from(prompt_tokens) * per_token(p.input)
            + u128::from(completion_tokens) * per_token(p.output);
        u64::try_from(total.div_ceil(u128::from(MICRO))).unwrap_or(u64::MAX)
    })
}

/// Micro-dollars as USD with 6 decimals (`1234567` → `1.234567`): the `x-freerelay-cost-usd`
/// header, exact.
pub fn format_usd(micro: u64) -> String {
    format!("{}.{:06}", micro / MICRO, micro % MICRO)
}

/// Micro-dollars for people: `$` and at least cents, more decimals only where they are not zero
/// (`5020000` → `$5.02`, `5000001` → `$5.000001`). Exact, never rounded.
pub fn display_usd(micro: u64) -> String {
    let s = format_usd(micro);
    let trimmed = s.trim_end_matches('0');
    let dot = trimmed.find('.').unwrap_or(trimmed.len());
    let keep = trimmed.len().max(dot + 3);
    format!("${}", &s[..keep])
}

/// `2026-11-26T00:00:00Z` for a Unix ms instant (UTC, whole seconds).
pub fn rfc3339(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / DAY_MS) as i64);
    let s = (ms % DAY_MS) / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

// ---------------------------------------------------------------------------------------------
// The burn rate.

/// `budget:v1:<scope>:ewma`: a scope's burn rates as of `at_ms`, and the day counter's total
/// then (µ$, UTC day index `day`), from which the next fold knows what was spent since.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    /// µ$ per second, τ = 1 hour ([`TAU_FAST_S`]).
    pub rate: f64,
    /// µ$ per second, τ = 1 day ([`TAU_SLOW_S`]).
    pub slow_rate: f64,
    pub at_ms: u64,
    pub day_total_at: u64,
    pub day: u64,
}

impl Ewma {
    /// A stored record; `None` if absent or unreadable (it is then started again).
    pub fn decode(bytes: Option<&[u8]>) -> Option<Self> {
        let e: Self = serde_json::from_slice(bytes?).ok()?;
        let ok = |r: f64| r.is_finite() && r >= 0.0;
        (ok(e.rate) && ok(e.slow_rate)).then_some(e)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A scope's first record: rates 0, spend counted from `day_total_before` (the day's total
    /// before the spend that creates it, so the next fold includes that spend).
    pub fn start(day: u64, day_total_before: u64, now_ms: u64) -> Self {
        Self {
            rate: 0.0,
            slow_rate: 0.0,
            at_ms: now_ms,
            day_total_at: day_total_before,
            day,
        }
    }

    /// Folds what was spent since `at_ms` into both rates, given the day counter's total
    /// `day_total` on UTC day `day` at `now_ms`. On a later day the spend since is that day's
    /// total; a clock behind the record's changes nothing.
    pub fn fold(&self, day: u64, day_total: u64, now_ms: u64) -> Self {
        if now_ms <= self.at_ms || day < self.day {
            return *self;
        }
        let spent = if day == self.day {
            day_total.saturating_sub(self.day_total_at)
        } else {
            day_total
        };
        let dt_s = (now_ms - self.at_ms) as f64 / 1000.0;
        let pace = spent as f64 / dt_s;
        let step = |rate: f64, tau: f64| rate - (-dt_s / tau).exp_m1() * (pace - rate);
        Self {
            rate: step(self.rate, TAU_FAST_S).max(0.0),
            slow_rate: step(self.slow_rate, TAU_SLOW_S).max(0.0),
            at_ms: now_ms,
            day_total_at: if day == self.day {
                day_total.max(self.day_total_at)
            } else {
                day_total
            },
            day,
        }
    }

    /// The rate that predicts a budget of this period.
    pub fn rate_for(&self, period: Period) -> f64 {
        match period {
            Period::Day => self.rate,
            Period::Month => self.slow_rate,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// The keys to read before routing, in the gateway's one batched `get_many`: for each counted
/// scope ([`Budgets::scopes`]: the gateway always, the tenant and its user where a limit applies),
/// its day counter, month counter and EWMA; so at least the gateway's three. [`Health::read`]
/// takes their values in this order.
pub fn state_keys(budgets: &Budgets, tenant: &Tenant) -> Vec<String> {
    budgets
        .scopes(tenant)
        .iter()
        .flat_map(|(_, scope, _)| {
            [
                keys::budget(scope, Period::Day.as_str()),
                keys::budget(scope, Period::Month.as_str()),
                keys::budget(scope, "ewma"),
            ]
        })
        .collect()
}

/// One budget (scope and period) as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetHealth {
    /// `global`, `<tenant>` or `<tenant>:<user>`.
    pub scope: String,
    pub level: Level,
    pub period: Period,
    pub limit_micro_usd: Option<u64>,
    pub spent_micro_usd: u64,
    pub remaining_micro_usd: Option<u64>,
    /// remaining / limit (0 when the limit is 0).
    pub fraction_left: Option<f64>,
    /// Spent at or over its limit.
    pub exhausted: bool,
    pub resets_at_ms: u64,
    pub resets_at: String,
    /// The burn rate that predicts this period (µ$ per second, folded up to now).
    pub rate_micro_usd_per_s: f64,
    /// When the limit is reached at this rate, if before the reset (and not yet reached).
    pub predicted_runout_ms: Option<u64>,
}

impl BudgetHealth {
    /// "Tenant t1a2b3c4d5e's daily budget of $5.00" and the like.
    fn describe(&self, limit: u64) -> String {
        let period = self.period.adjective();
        let limit = display_usd(limit);
        match self.level {
            Level::Global => format!("The gateway's {period} budget of {limit}"),
            Level::Tenant => format!("Tenant {}'s {period} budget of {limit}", self.scope),
            Level::User => {
                let (t, u) = self.scope.split_once(':').unwrap_or((&self.scope, ""));
                format!("Tenant {t}'s {period} budget of {limit} for user {u}")
            }
        }
    }
}

/// The budgets that apply to one request, as read before routing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub lean_free_at: f64,
    /// [`Health::lean_free`], for the JSON.
    lean_free: bool,
    /// Every counted scope's day and month ([`Budgets::scopes`]: the gateway always, the tenant
    /// and its user where a limit applies), broadest scope first.
    pub budgets: Vec<BudgetHealth>,
    /// Each scope's EWMA record as read: tells [`record_spend`] whether a fold is due without
    /// reading it again.
    #[serde(skip)]
    seen: Vec<(String, Option<Ewma>)>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            lean_free_at: DEFAULT_LEAN_FREE_AT,
            lean_free: false,
            budgets: Vec::new(),
            seen: Vec::new(),
        }
    }
}

impl Health {
    /// The budgets of `tenant` from the values of [`state_keys`] (missing or unreadable values
    /// count as nothing spent, no rate).
    pub fn read(
        budgets: &Budgets,
        tenant: &Tenant,
        values: &[Option<Vec<u8>>],
        now_ms: u64,
    ) -> Self {
        let value = |i: usize| values.get(i).and_then(Option::as_deref);
        let mut health = Self {
            lean_free_at: budgets.lean_free_at,
            ..Self::default()
        };
        for (s, (level, scope, limits)) in budgets.scopes(tenant).into_iter().enumerate() {
            let day = Period::Day.window(now_ms);
            let day_total = MONEY.count_in(day, value(3 * s));
            let ewma = Ewma::decode(value(3 * s + 2));
            let now_rates = ewma.map(|e| e.fold(day, day_total, now_ms));
            for (p, period) in Period::ALL.into_iter().enumerate() {
                let spent = MONEY.count_in(period.window(now_ms), value(3 * s + p));
                let limit = limits.of(period);
                let resets_at_ms = period.resets_at_ms(now_ms);
                let rate = now_rates.map_or(0.0, |e| e.rate_for(period));
                let remaining = limit.map(|l| l.saturating_sub(spent));
                let predicted_runout_ms = remaining
                    .filter(|&r| r > 0 && rate > 0.0)
                    .map(|r| now_ms.saturating_add((r as f64 / rate * 1000.0).ceil() as u64))
                    .filter(|&t| t < resets_at_ms);
                health.budgets.push(BudgetHealth {
                    scope: scope.clone(),
                    level,
                    period,
                    limit_micro_usd: limit,
                    spent_micro_usd: spent,
                    remaining_micro_usd: remaining,
                    fraction_left: limit.map(|l| match remaining {
                        Some(r) if l > 0 => r as f64 / l as f64,
                        _ => 0.0,
                    }),
                    exhausted: limit.is_some_and(|l| spent >= l),
                    resets_at_ms,
                    resets_at: rfc3339(resets_at_ms),
                    rate_micro_usd_per_s: rate,
                    predicted_runout_ms,
                });
            }
            health.seen.push((scope, ewma));
        }
        // Only limited periods lean: the gateway's spend is read even without a global limit.
        health.lean_free = health.budgets.iter().any(|b| {
            b.limit_micro_usd.is_some()
                && (b.exhausted
                    || b.predicted_runout_ms.is_some()
                    || b.fraction_left.is_some_and(|f| f < budgets.lean_free_at))
        });
        health
    }

    /// Whether `auto` should lean free: some budget (a period with a limit) is spent, or has less
    /// than `lean_free_at` of itself left, or is predicted to run out before it resets.
    pub fn lean_free(&self) -> bool {
        self.lean_free
    }

    /// The error that refuses paid routes while a budget is spent: of the spent ones, the one
    /// that resets last (the broadest on a tie), with `Retry-After` until then. `None` while
    /// every budget has money left. A period without a limit (the gateway's, without global
    /// budgets) only reports its spend: it never refuses.
    pub fn refusal(&self, now_ms: u64) -> Option<ApiError> {
        let (b, limit) = self
            .budgets
            .iter()
            .filter(|b| b.exhausted)
            .filter_map(|b| Some((b, b.limit_micro_usd?)))
            .reduce(|a, b| {
                if b.0.resets_at_ms > a.0.resets_at_ms {
                    b
                } else {
                    a
                }
            })?;
        const FREE: &str = "Free models keep serving: ask for `free` or a free model.";
        if limit == 0 {
            let message = format!("{} allows no paid models. {FREE}", b.describe(0));
            return Some(ApiError::budget_exhausted(message, None));
        }
        let message = format!(
            "{} is spent ({}); it resets at {}. {FREE}",
            b.describe(limit),
            display_usd(b.spent_micro_usd),
            b.resets_at
        );
        let wait_s = b.resets_at_ms.saturating_sub(now_ms).div_ceil(1000);
        Some(ApiError::budget_exhausted(message, Some(wait_s)))
    }
}

// ---------------------------------------------------------------------------------------------
// Recording.

/// One counter increment of a request's spend ([`spend`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub scope: String,
    pub period: Period,
    pub inc: Windowed,
}

/// The increments of a request that cost `micro` µ$: the day and month counters of each counted
/// scope ([`Budgets::scopes`]: the gateway always, the tenant and its user where a limit applies),
/// broadest scope first. Empty for a free answer.
pub fn spend(budgets: &Budgets, tenant: &Tenant, micro: u64, now_ms: u64) -> Vec<Increment> {
    if micro == 0 {
        return Vec::new();
    }
    let delta = i64::try_from(micro).unwrap_or(i64::MAX);
    budgets
        .scopes(tenant)
        .into_iter()
        .flat_map(|(_, scope, _)| {
            Period::ALL.map(|period| Increment {
                inc: Windowed {
                    key: keys::budget(&scope, period.as_str()),
                    delta,
                    window: period.window(now_ms),
                    layout: MONEY,
                },
                scope: scope.clone(),
                period,
            })
        })
        .collect()
}

/// A counter's total after a request's spend was added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    pub scope: String,
    pub period: Period,
    /// µ$ spent in the period, this request included.
    pub total: u64,
}

/// Adds a request's cost to every counted scope's counters ([`spend`], [`counter::perform`]: exact
/// under concurrency) and folds each scope's EWMA when a fold is due: `seen` is the [`Health`]
/// read at the request's start (a fold is due when its record is absent or 60 s old; a scope it
/// does not know is checked by reading the record). A free answer writes nothing. Returns the
/// new totals.
pub fn record_spend(
    kv: &(impl Kv + ?Sized),
    budgets: &Budgets,
    tenant: &Tenant,
    micro: u64,
    seen: &Health,
    now_ms: u64,
) -> KvResult<Vec<Spent>> {
    let mut totals = Vec::new();
    for i in spend(budgets, tenant, micro, now_ms) {
        let total = counter::perform(kv, &i.inc)?;
        totals.push(Spent {
            scope: i.scope,
            period: i.period,
            total,
        });
    }
    let day = Period::Day.window(now_ms);
    for t in totals.iter().filter(|t| t.period == Period::Day) {
        let known = seen.seen.iter().find(|(s, _)| *s == t.scope);
        if let Some((_, Some(e))) = known {
            if now_ms.saturating_sub(e.at_ms) < FOLD_EVERY_MS {
                continue;
            }
        }
        cas_update(kv, &keys::budget(&t.scope, "ewma"), |current| {
            let next = match Ewma::decode(current) {
                Some(e) if now_ms.saturating_sub(e.at_ms) < FOLD_EVERY_MS => return None,
                Some(e) => e.fold(day, t.total, now_ms),
                None => Ewma::start(day, t.total.saturating_sub(micro), now_ms),
            };
            Some(next.encode())
        })?;
    }
    Ok(totals)
}

// ---------------------------------------------------------------------------------------------
// Free-tier daily quotas.

/// A day's requests are judged as if at least this much of the day had passed, so that its
/// first few requests do not predict a run-out within minutes.
pub const MIN_ELAPSED_MS: u64 = 3_600_000;

/// When a daily request quota runs out at today's average pace: `count_today` requests since
/// `day_start_ms` (the provider's midnight, `quota::day_start_ms`), projected linearly; the
/// instant if it falls before `next_reset_ms`, else `None`. `Some(now_ms)` when it is already
/// spent; `None` with no requests yet. The elapsed time counts as at least an hour
/// ([`MIN_ELAPSED_MS`]).
pub fn rpd_runout(
    count_today: u64,
    limit: u32,
    day_start_ms: u64,
    next_reset_ms: u64,
    now_ms: u64,
) -> Option<u64> {
    let limit = u64::from(limit);
    if count_today >= limit {
        return Some(now_ms);
    }
    if count_today == 0 {
        return None;
    }
    let elapsed = now_ms.saturating_sub(day_start_ms).max(MIN_ELAPSED_MS);
    let left_ms = u128::from(limit - count_today) * u128::from(elapsed) / u128::from(count_today);
    let at = u64::try_from(u128::from(now_ms) + left_ms).unwrap_or(u64::MAX);
    (at < next_reset_ms).then_some(at)
}

/// A daily request quota and its predicted run-out ([`rpd_runout`]), for the state endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaForecast {
    pub used: u64,
    pub limit: u32,
    pub resets_at_ms: u64,
    pub predicted_runout_ms: Option<u64>,
}

impl QuotaForecast {
    pub fn new(
        count_today: u64,
        limit: u32,
        day_start_ms: u64,
        next_reset_ms: u64,
        now_ms: u64,
    ) -> Self {
        Self {
            used: count_today,
            limit,
            resets_at_ms: next_reset_ms,
            predicted_runout_ms: rpd_runout(
                count_today,
                limit,
                day_start_ms,
                next_reset_ms,
                now_ms,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{testing, KvError, MemKv};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    const H: u64 = 3_600_000;
    const MIN: u64 = 60_000;

    /// Unix ms of a UTC date and time.
    fn utc(y: i64, m: u32, d: u32, h: u64, min: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * DAY_MS + h * H + min * MIN
    }

    fn usd(s: &str) -> u64 {
        parse_usd(s).unwrap()
    }

    use crate::config::tests::vars;

    fn budgets(pairs: &[(&str, &str)]) -> Budgets {
        Budgets::from_vars(vars(pairs)).unwrap()
    }

    fn digest(key: &str) -> String {
        crate::auth::digest_hex(key)
    }

    /// Records every write and counts the EWMA compare-and-swaps.
    #[derive(Default)]
    struct Recorder {
        written: Mutex<Vec<(String, Vec<u8>)>>,
        ewma_swaps: AtomicUsize,
    }

    impl testing::Hook for Recorder {
        fn before(&self, op: &'static str, key: &str, _inner: &MemKv) -> KvResult<()> {
            if op == "cas" && key.ends_with(":ewma") {
                self.ewma_swaps.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
        fn wrote(&self, key: &str, value: &[u8]) {
            let mut w = self.written.lock().unwrap();
            w.push((key.to_owned(), value.to_vec()));
        }
    }

    type Spy = testing::Hooked<Recorder>;

    fn redis_spy() -> Spy {
        testing::Hooked::new(MemKv::redis_like(), Recorder::default())
    }

    fn read(kv: &impl Kv, b: &Budgets, t: &Tenant, now: u64) -> Health {
        let values = kv.get_many(&state_keys(b, t)).unwrap();
        Health::read(b, t, &values, now)
    }

    fn find<'a>(h: &'a Health, scope: &str, period: Period) -> &'a BudgetHealth {
        h.budgets
            .iter()
            .find(|b| b.scope == scope && b.period == period)
            .unwrap_or_else(|| panic!("no {scope} {period:?} in {h:?}"))
    }

    #[test]
    fn tenants_and_users_are_pseudonyms() {
        let d = digest("fr-alice-key");
        let t = Tenant::of(&d, None, None);
        assert_eq!(t.id, format!("t{}", &d[..10]));
        assert_eq!(t.user, None);
        assert_eq!(Tenant::of(&d.to_uppercase(), None, None), t);
        // The user id, trimmed, is what is hashed: `printf %s 42 | sha256sum`.
        let u = Tenant::of(&d, Some(" 42 "), Some("x@y.z"));
        assert_eq!(
            u.user.as_deref(),
            Some(&format!("u{}", &digest("42")[..10])[..])
        );
        assert_eq!(
            u.user_scope().unwrap(),
            format!("{}:{}", t.id, u.user.unwrap())
        );
        // Without an id, the email, case-folded; blank headers are absent.
        let e = Tenant::of(&d, Some("  "), Some(" Alice@Example.COM "));
        assert_eq!(
            e.user.as_deref(),
            Some(&format!("u{}", &digest("alice@example.com")[..10])[..])
        );
        assert_eq!(Tenant::of(&d, Some(""), Some(" ")).user, None);
    }

    #[test]
    fn usd_amounts_parse_exactly_or_not_at_all() {
        assert_eq!(usd("5"), 5_000_000);
        assert_eq!(usd(" 5.5 "), 5_500_000);
        assert_eq!(usd("0.000001"), 1);
        assert_eq!(usd("12.50"), 12_500_000);
        assert_eq!(usd("0"), 0);
        assert_eq!(usd("10000000"), MAX_LIMIT_MICRO);
        // 0.1 + 0.2 in f64 is 0.30000000000000004; from the text it is exact.
        assert_eq!(usd("0.3"), 300_000);
        let seventh = parse_usd("12.3456789").unwrap_err();
        assert!(seventh.contains("6 decimal places"), "{seventh}");
        for bad in [
            "", "-1", "+1", "$5", "5.", ".5", "1e3", "5,00", "five", "1.2.3", "0x10",
        ] {
            assert!(parse_usd(bad).is_err(), "{bad:?}");
        }
        assert!(parse_usd("10000000.000001")
            .unwrap_err()
            .contains("largest"));
        assert!(parse_usd("99999999999999999999999").is_err());
    }

    #[test]
    fn variables_defaults_and_overrides() {
        let b = Budgets::from_vars(|_| None).unwrap();
        assert_eq!(b, Budgets::default());
        let t = Tenant::of(&digest("k"), Some("bob"), None);
        // Without budgets only the gateway's own scope is counted, without limits.
        assert_eq!(
            b.scopes(&t),
            [(Level::Global, "global".to_owned(), Limits::default())]
        );
        assert_eq!(
            state_keys(&b, &t),
            [
                "budget:v1:global:day",
                "budget:v1:global:month",
                "budget:v1:global:ewma"
            ]
        );
        // A global limit alone counts no tenant nor user; a tenant limit counts the tenant only.
        let only_global = budgets(&[(BUDGET_DAILY_USD, "5")]);
        assert_eq!(only_global.scopes(&t).len(), 1);
        let only_tenant = budgets(&[(TENANT_BUDGET_MONTHLY_USD, "5")]);
        let levels: Vec<Level> = only_tenant.scopes(&t).iter().map(|s| s.0).collect();
        assert_eq!(levels, [Level::Global, Level::Tenant]);

        let tid = t.id.clone();
        let scope_u = t.user_scope().unwrap();
        let b = budgets(&[
            (BUDGET_MONTHLY_USD, "100"),
            (TENANT_BUDGET_DAILY_USD, "5"),
            (TENANT_BUDGET_MONTHLY_USD, "50"),
            (USER_BUDGET_DAILY_USD, "1"),
            (
                TENANT_BUDGETS,
                &format!(
                    " {}=monthly:200 ;\n{scope_u}=daily:none,monthly:7.5;; t0000000000=daily:0",
                    tid.to_uppercase()
                ),
            ),
            (BUDGET_LEAN_FREE_AT, "0.1"),
        ]);
        assert_eq!(b.lean_free_at, 0.1);
        assert_eq!(
            b.limits(Level::Tenant, &tid),
            Limits {
                daily: Some(5_000_000),
                monthly: Some(200_000_000)
            }
        );
        assert_eq!(
            b.limits(Level::User, &scope_u),
            Limits {
                daily: None,
                monthly: Some(7_500_000)
            }
        );
        assert_eq!(b.limits(Level::Tenant, "t0000000000").daily, Some(0));
        // Another tenant and its users get the defaults.
        assert_eq!(b.limits(Level::Tenant, "t1111111111"), b.tenant);
        assert_eq!(b.limits(Level::User, "t1111111111:u2222222222"), b.user);
        let levels: Vec<Level> = b.scopes(&t).iter().map(|s| s.0).collect();
        assert_eq!(levels, [Level::Global, Level::Tenant, Level::User]);
        assert_eq!(
            state_keys(&b, &t),
            [
                "budget:v1:global:day",
                "budget:v1:global:month",
                "budget:v1:global:ewma",
                &format!("budget:v1:{tid}:day"),
                &format!("budget:v1:{tid}:month"),
                &format!("budget:v1:{tid}:ewma"),
                &format!("budget:v1:{scope_u}:day"),
                &format!("budget:v1:{scope_u}:month"),
                &format!("budget:v1:{scope_u}:ewma"),
            ]
        );
        // Without a user header, no user scope.
        assert_eq!(b.scopes(&Tenant::of(&digest("k"), None, None)).len(), 2);
        // A tenant whose override lifts its only limit is not counted; nor is such a user.
        let lifted = budgets(&[
            (TENANT_BUDGET_DAILY_USD, "5"),
            (USER_BUDGET_DAILY_USD, "1"),
            (
                TENANT_BUDGETS,
                &format!("{tid}=daily:none; {scope_u}=daily:none"),
            ),
        ]);
        let levels: Vec<Level> = lifted.scopes(&t).iter().map(|s| s.0).collect();
        assert_eq!(levels, [Level::Global]);
    }

    #[test]
    fn override_errors_name_the_entry_and_what_was_expected() {
        let err = |text: &str| Budgets::from_vars(vars(&[(TENANT_BUDGETS, text)])).unwrap_err();
        let e = err("t1a2b3c4d5e=daily:5; t9f8e7d6c5b=monthy:200");
        assert!(e.contains("entry #2 (`t9f8e7d6c5b=monthy:200`)"), "{e}");
        assert!(
            e.contains("unknown period `monthy`, expected `daily` or `monthly`"),
            "{e}"
        );
        let e = err("t1a2b3c4d5e daily:5");
        assert!(
            e.contains("#1") && e.contains("expected `<tenant>=daily:<usd>"),
            "{e}"
        );
        let e = err("t1a2b3c4d5=daily:5");
        assert!(e.contains("is not a tenant"), "{e}");
        let e = err("x1a2b3c4d5e=daily:5");
        assert!(e.contains("is not a tenant"), "{e}");
        let e = err("t1a2b3c4d5e:bob=daily:5");
        assert!(e.contains("`<tenant>:<user>`"), "{e}");
        let e = err("t1a2b3c4d5e=daily:5;t1a2b3c4d5e=monthly:9");
        assert!(e.contains("#2") && e.contains("already set"), "{e}");
        let e = err("t1a2b3c4d5e=daily:5,daily:6");
        assert!(e.contains("`daily` is given twice"), "{e}");
        let e = err("t1a2b3c4d5e=daily:12.3456789");
        assert!(
            e.contains("`12.3456789`: more than 6 decimal places"),
            "{e}"
        );
        let e = err("t1a2b3c4d5e=daily");
        assert!(e.contains("expected `daily:<usd>`"), "{e}");
        let e = err("t1a2b3c4d5e=");
        assert!(e.contains("expected `daily:<usd>`"), "{e}");
        // Plain variables name themselves.
        let e = Budgets::from_vars(vars(&[(USER_BUDGET_MONTHLY_USD, "$5")])).unwrap_err();
        assert!(
            e.contains("`user_budget_monthly_usd`") && e.contains("plain decimal"),
            "{e}"
        );
        for bad in ["1.5", "-0.1", "NaN", "a quarter"] {
            let e = Budgets::from_vars(vars(&[(BUDGET_LEAN_FREE_AT, bad)])).unwrap_err();
            assert!(e.contains("budget_lean_free_at"), "{e}");
        }
    }

    fn price(input: f64, output: f64) -> Option<Price> {
        Some(Price {
            input,
            output,
            source: "test",
        })
    }

    #[test]
    fn micro_usd_is_exact_and_rounds_up_once() {
        assert_eq!(micro_usd(price(0.59, 0.79), 1000, 0), Some(590));
        assert_eq!(micro_usd(price(0.59, 0.79), 1000, 1000), Some(1380));
        // 0.07 × 100 is 7.000000000000001 in f64: a naive ceiling would count 8.
        assert_eq!(micro_usd(price(0.07, 0.0), 100, 0), Some(7));
        // 0.05 µ$ + 0.08 µ$ = 0.13 µ$: one micro-dollar, rounded once for the request.
        assert_eq!(micro_usd(price(0.05, 0.08), 1, 1), Some(1));
        assert_eq!(micro_usd(price(0.05, 0.08), 20, 0), Some(1));
        assert_eq!(micro_usd(price(0.05, 0.08), 21, 0), Some(2));
        assert_eq!(
            micro_usd(price(2.5, 10.0), 1_000_000, 100_000),
            Some(3_500_000)
        );
        assert_eq!(micro_usd(price(0.05, 0.08), 0, 0), Some(0));
        assert_eq!(micro_usd(price(0.0, 0.0), 10_000, 10_000), Some(0));
        assert_eq!(micro_usd(None, 10, 10), None);
        assert_eq!(micro_usd(price(-1.0, f64::NAN), 10, 10), Some(0));
        assert_eq!(
            micro_usd(price(1e12, 1e12), u64::MAX, u64::MAX),
            Some(u64::MAX)
        );
    }

    #[test]
    fn usd_formats() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1_234_567), "1.234567");
        assert_eq!(format_usd(7), "0.000007");
        assert_eq!(display_usd(5_000_000), "$5.00");
        assert_eq!(display_usd(5_020_000), "$5.02");
        assert_eq!(display_usd(5_000_001), "$5.000001");
        assert_eq!(display_usd(123), "$0.000123");
        assert_eq!(display_usd(0), "$0.00");
        assert_eq!(display_usd(10_500_000), "$10.50");
        assert_eq!(rfc3339(utc(2026, 11, 26, 0, 0)), "2026-11-26T00:00:00Z");
        assert_eq!(
            rfc3339(utc(2024, 2, 29, 23, 59) + 59_999),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn periods_windows_and_resets() {
        let t = utc(2026, 12, 31, 23, 59);
        assert_eq!(Period::Day.resets_at_ms(t), utc(2027, 1, 1, 0, 0));
        assert_eq!(Period::Month.resets_at_ms(t), utc(2027, 1, 1, 0, 0));
        assert_eq!(Period::Month.window(t), 2026 * 12 + 11);
        assert_eq!(Period::Month.window(t + 2 * MIN), 2027 * 12);
        assert_eq!(
            Period::Month.resets_at_ms(utc(2024, 2, 1, 0, 0)),
            utc(2024, 3, 1, 0, 0)
        );
        assert_eq!(Period::Day.window(t) + 1, Period::Day.window(t + 2 * MIN));
        assert!(Period::Month.window(utc(2200, 1, 1, 0, 0)) <= MONEY.max_window());
    }

    /// 16 threads × 100 spends of odd amounts, across tenants, users and a day change: every
    /// scope's counters hold exactly the sum, in either store's encoding.
    #[test]
    fn concurrent_spends_sum_exactly() {
        for redis in [false, true] {
            let kv = Arc::new(if redis {
                MemKv::redis_like()
            } else {
                MemKv::default()
            });
            let b = Arc::new(budgets(&[
                (BUDGET_DAILY_USD, "1000"),
                (TENANT_BUDGET_MONTHLY_USD, "1000"),
                (USER_BUDGET_DAILY_USD, "1000"),
            ]));
            let day1 = utc(2026, 11, 25, 23, 59);
            let day2 = utc(2026, 11, 26, 0, 0);
            let tenant = |i: u64| {
                let who = ["alice", "bob", "carol", "dave"][i as usize % 4];
                Tenant::of(&digest(&format!("key{}", i % 2)), Some(who), None)
            };
            // Yesterday's spend, to be replaced as the day starts under contention.
            for i in 0..4 {
                record_spend(&*kv, &b, &tenant(i), 999, &Health::default(), day1).unwrap();
            }
            let threads: Vec<_> = (0..16u64)
                .map(|t| {
                    let (kv, b) = (kv.clone(), b.clone());
                    let me = tenant(t);
                    std::thread::spawn(move || {
                        for i in 0..100u64 {
                            let micro = 2 * (t * 100 + i) + 1;
                            let now = day2 + i * 1000;
                            record_spend(&*kv, &b, &me, micro, &Health::default(), now).unwrap();
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let mut want: HashMap<String, u64> = HashMap::new();
            for t in 0..16u64 {
                let s: u64 = (0..100u64).map(|i| 2 * (t * 100 + i) + 1).sum();
                let me = tenant(t);
                for scope in ["global".to_owned(), me.id.clone(), me.user_scope().unwrap()] {
                    *want.entry(scope).or_default() += s;
                }
            }
            assert_eq!(want["global"], (0..1600u64).map(|n| 2 * n + 1).sum::<u64>());
            let now = day2 + 100_000;
            for t in 0..4 {
                let me = tenant(t);
                let h = read(&*kv, &b, &me, now);
                assert_eq!(
                    find(&h, "global", Period::Day).spent_micro_usd,
                    want["global"]
                );
                let tid = me.id.clone();
                // The tenant's month keeps yesterday (two users of each key spent 999 each).
                assert_eq!(
                    find(&h, &tid, Period::Month).spent_micro_usd,
                    want[&tid] + 2 * 999
                );
                assert_eq!(find(&h, &tid, Period::Day).spent_micro_usd, want[&tid]);
                let us = me.user_scope().unwrap();
                assert_eq!(find(&h, &us, Period::Day).spent_micro_usd, want[&us]);
                assert_eq!(
                    find(&h, &us, Period::Month).spent_micro_usd,
                    want[&us] + 999
                );
                // Every scope's EWMA record is readable after the race.
                let raw = kv.get(&keys::budget(&us, "ewma")).unwrap();
                assert!(Ewma::decode(raw.as_deref()).is_some());
            }
        }
    }

    #[test]
    fn days_roll_over_and_months_keep_then_roll() {
        for kv in [MemKv::default(), MemKv::redis_like()] {
            let b = budgets(&[
                (TENANT_BUDGET_DAILY_USD, "5"),
                (TENANT_BUDGET_MONTHLY_USD, "50"),
            ]);
            let t = Tenant::of(&digest("k"), None, None);
            let h0 = Health::default();
            let spend_at = |micro, now| record_spend(&kv, &b, &t, micro, &h0, now).unwrap();
            // The gateway (always counted) and the tenant, day then month each.
            let totals = spend_at(3_000_000, utc(2026, 11, 30, 23, 0));
            let scopes: Vec<_> = totals.iter().map(|s| (&s.scope[..], s.period)).collect();
            assert_eq!(
                scopes,
                [
                    ("global", Period::Day),
                    ("global", Period::Month),
                    (&t.id[..], Period::Day),
                    (&t.id[..], Period::Month)
                ]
            );
            assert_eq!(
                totals.iter().map(|s| s.total).collect::<Vec<_>>(),
                [3_000_000; 4]
            );
            let totals = spend_at(1_000_000, utc(2026, 11, 30, 23, 59));
            assert_eq!(
                totals.iter().map(|s| s.total).collect::<Vec<_>>(),
                [4_000_000; 4]
            );
            // A new day: the day starts again, the month keeps counting.
            let h = read(&kv, &b, &t, utc(2026, 12, 1, 0, 0) - 1);
            assert_eq!(find(&h, &t.id, Period::Day).spent_micro_usd, 4_000_000);
            let h = read(&kv, &b, &t, utc(2026, 11, 30, 0, 0) + DAY_MS);
            assert_eq!(find(&h, &t.id, Period::Day).spent_micro_usd, 0);
            assert_eq!(find(&h, &t.id, Period::Month).spent_micro_usd, 0);
            assert_eq!(find(&h, "global", Period::Month).spent_micro_usd, 0);
            // (The next day is also a new month here.) Mid-month, the month keeps the day.
            spend_at(2_000_000, utc(2026, 12, 14, 10, 0));
            let totals = spend_at(500_000, utc(2026, 12, 15, 0, 5));
            assert_eq!(
                totals.iter().map(|s| s.total).collect::<Vec<_>>(),
                [500_000, 2_500_000, 500_000, 2_500_000]
            );
            let h = read(&kv, &b, &t, utc(2026, 12, 15, 1, 0));
            assert_eq!(find(&h, &t.id, Period::Day).spent_micro_usd, 500_000);
            assert_eq!(find(&h, &t.id, Period::Month).spent_micro_usd, 2_500_000);
            let g = find(&h, "global", Period::Month);
            assert_eq!((g.spent_micro_usd, g.limit_micro_usd), (2_500_000, None));
            assert_eq!(
                find(&h, &t.id, Period::Month).resets_at,
                "2027-01-01T00:00:00Z"
            );
        }
    }

    #[test]
    fn a_spent_budget_refuses_with_its_name_amounts_and_reset() {
        let d = digest("k");
        let t = Tenant::of(&d, Some("u1"), None);
        let b = budgets(&[(TENANT_BUDGET_DAILY_USD, "5"), (BUDGET_MONTHLY_USD, "1000")]);
        let kv = MemKv::default();
        let morning = utc(2026, 11, 25, 9, 0);
        record_spend(&kv, &b, &t, 4_990_000, &Health::default(), morning).unwrap();
        let now = utc(2026, 11, 25, 15, 0);
        let h = read(&kv, &b, &t, now);
        assert!(h.refusal(now).is_none());
        record_spend(&kv, &b, &t, 30_000, &h, now).unwrap();
        let h = read(&kv, &b, &t, now);
        let e = h.refusal(now).unwrap();
        assert_eq!(
            e.message,
            format!(
                "Tenant {}'s daily budget of $5.00 is spent ($5.02); it resets at \
                 2026-11-26T00:00:00Z. Free models keep serving: ask for `free` or a free model.",
                t.id
            )
        );
        assert_eq!(
            (e.status, e.kind, e.code),
            (429, "insufficient_quota", Some("insufficient_quota"))
        );
        assert_eq!(e.retry_after, Some(9 * 3600));
        assert!(h.lean_free());
        // The month's budget is far from spent and predicts nothing yet.
        let month = find(&h, "global", Period::Month);
        assert!(!month.exhausted && month.limit_micro_usd == Some(1_000_000_000));
        // The next day, the tenant may spend again.
        let tomorrow = utc(2026, 11, 26, 0, 0);
        assert!(read(&kv, &b, &t, tomorrow).refusal(tomorrow).is_none());

        // Several spent: the one that resets last is named (the month, whose wait is longest).
        let b = budgets(&[(BUDGET_DAILY_USD, "1"), (USER_BUDGET_MONTHLY_USD, "0.5")]);
        let kv = MemKv::default();
        record_spend(&kv, &b, &t, 1_000_000, &Health::default(), now).unwrap();
        let e = read(&kv, &b, &t, now).refusal(now).unwrap();
        let u = t.user.as_deref().unwrap();
        assert_eq!(
            e.message,
            format!(
                "Tenant {}'s monthly budget of $0.50 for user {u} is spent ($1.00); it resets at \
                 2026-12-01T00:00:00Z. Free models keep serving: ask for `free` or a free model.",
                t.id
            )
        );
        assert_eq!(e.retry_after, Some((utc(2026, 12, 1, 0, 0) - now) / 1000));
        // The gateway's own budget, worded as such.
        let b = budgets(&[(BUDGET_DAILY_USD, "1")]);
        let e = read(&kv, &b, &t, now).refusal(now).unwrap();
        assert!(e
            .message
            .starts_with("The gateway's daily budget of $1.00 is spent ($1.00)"));

        // A budget of 0 turns paid models off, with nothing to wait for.
        let b = budgets(&[(TENANT_BUDGETS, &format!("{}=daily:0", t.id))]);
        let h = read(&MemKv::default(), &b, &t, now);
        let e = h.refusal(now).unwrap();
        assert_eq!(
            e.message,
            format!(
                "Tenant {}'s daily budget of $0.00 allows no paid models. Free models keep \
                 serving: ask for `free` or a free model.",
                t.id
            )
        );
        assert_eq!(e.retry_after, None);
    }

    #[test]
    fn lean_free_below_the_threshold() {
        let t = Tenant::of(&digest("k"), None, None);
        let now = utc(2026, 11, 25, 12, 0);
        let b = budgets(&[(TENANT_BUDGET_DAILY_USD, "10")]);
        // The values of state_keys: the gateway's three, then the tenant's.
        let at = |spent: u64, b: &Budgets| {
            let v = MONEY.encode(Period::Day.window(now), spent);
            let day = Some(v.to_le_bytes().to_vec());
            let values = vec![day.clone(), None, None, day, None, None];
            Health::read(b, &t, &values, now)
        };
        // No rate (no EWMA record): only the fraction left decides.
        assert!(!at(7_000_000, &b).lean_free()); // 30% left
        assert!(!at(7_500_000, &b).lean_free()); // 25% left: not below
        assert!(at(7_500_001, &b).lean_free());
        let h = at(7_500_001, &b);
        assert!(h.refusal(now).is_none());
        let lean = budgets(&[
            (TENANT_BUDGET_DAILY_USD, "10"),
            (BUDGET_LEAN_FREE_AT, "0.5"),
        ]);
        assert!(at(5_000_001, &lean).lean_free() && !at(5_000_000, &lean).lean_free());
        let never = budgets(&[(TENANT_BUDGET_DAILY_USD, "10"), (BUDGET_LEAN_FREE_AT, "0")]);
        assert!(!at(9_999_999, &never).lean_free());
        assert!(at(10_000_000, &never).lean_free()); // spent
                                                     // Without budgets nothing leans and nothing refuses, whatever the gateway spent: its
                                                     // day and month are still reported, without limits.
        let none = at(u64::from(u32::MAX), &Budgets::default());
        assert!(!none.lean_free() && none.refusal(now).is_none());
        assert_eq!(none.budgets.len(), 2);
        let day = find(&none, "global", Period::Day);
        assert_eq!(day.spent_micro_usd, u64::from(u32::MAX));
        assert!(day.limit_micro_usd.is_none() && day.fraction_left.is_none() && !day.exhausted);
        let empty = Health::read(&Budgets::default(), &t, &[], now);
        assert!(!empty.lean_free() && empty.refusal(now).is_none());
    }

    /// Spends `micro` every `every_ms` from `from` to `to` (exclusive), the way the gateway
    /// does: read the state, then record.
    fn burn(kv: &impl Kv, b: &Budgets, t: &Tenant, micro: u64, every_ms: u64, from: u64, to: u64) {
        let mut now = from;
        while now < to {
            let seen = read(kv, b, t, now);
            record_spend(kv, b, t, micro, &seen, now).unwrap();
            now += every_ms;
        }
    }

    #[test]
    fn the_ewma_folds_once_a_minute_at_most() {
        let kv = Spy::default();
        let b = budgets(&[(TENANT_BUDGET_DAILY_USD, "100")]);
        let t = Tenant::of(&digest("k"), None, None);
        let start = utc(2026, 11, 25, 8, 0);
        // A request a second for 10 minutes: one start, then a fold each minute, in each of the
        // two scopes (the gateway's, always counted, and the tenant's).
        burn(&kv, &b, &t, 10, 1000, start, start + 10 * MIN);
        assert_eq!(kv.hook.ewma_swaps.load(Ordering::SeqCst), 2 * 10);
        // Without the read hint, the record is read and the swap still skipped within the minute.
        let before = kv.hook.ewma_swaps.load(Ordering::SeqCst);
        for i in 0..30 {
            let now = start + 10 * MIN + i * 1000;
            record_spend(&kv, &b, &t, 10, &Health::default(), now).unwrap();
        }
        assert_eq!(kv.hook.ewma_swaps.load(Ordering::SeqCst), before + 2);
        // A free answer writes nothing at all.
        let writes = kv.hook.written.lock().unwrap().len();
        let r = record_spend(&kv, &b, &t, 0, &Health::default(), start + H).unwrap();
        assert!(r.is_empty());
        assert_eq!(kv.hook.written.lock().unwrap().len(), writes);
    }

    #[test]
    fn the_gateway_is_always_counted_tenants_and_users_only_with_a_limit() {
        let t = Tenant::of(&digest("k"), Some("bob"), None);
        let user = t.user_scope().unwrap();
        let start = utc(2026, 11, 25, 8, 0);
        let scopes_written = |kv: &Spy| {
            let mut scopes: Vec<String> = kv
                .hook
                .written
                .lock()
                .unwrap()
                .iter()
                .map(|(k, _)| k.rsplit_once(':').unwrap().0.to_owned())
                .collect();
            scopes.sort();
            scopes.dedup();
            scopes
        };
        // No budgets at all: the gateway's day, month and EWMA, nothing per tenant or user.
        let kv = Spy::default();
        let b = Budgets::default();
        burn(&kv, &b, &t, 1_000, 1000, start, start + 5 * MIN);
        assert_eq!(scopes_written(&kv), ["budget:v1:global"]);
        // One start, then a fold a minute.
        assert_eq!(kv.hook.ewma_swaps.load(Ordering::SeqCst), 5);
        let h = read(&kv, &b, &t, start + 5 * MIN);
        assert_eq!(h.budgets.len(), 2);
        let day = find(&h, "global", Period::Day);
        assert_eq!(day.spent_micro_usd, 300 * 1_000);
        assert_eq!(
            find(&h, "global", Period::Month).spent_micro_usd,
            300 * 1_000
        );
        assert!(day.rate_micro_usd_per_s > 0.0 && day.predicted_runout_ms.is_none());
        assert!(!h.lean_free() && h.refusal(start + 5 * MIN).is_none());
        // A tenant limit: the tenant too, still not its user.
        let kv = Spy::default();
        let b = budgets(&[(TENANT_BUDGET_DAILY_USD, "5")]);
        burn(&kv, &b, &t, 1_000, 1000, start, start + 2 * MIN);
        let tenant = format!("budget:v1:{}", t.id);
        assert_eq!(scopes_written(&kv), ["budget:v1:global", &tenant[..]]);
        // A user limit alone: the gateway and the user, not the tenant (which has no limit).
        let kv = Spy::default();
        let b = budgets(&[(USER_BUDGET_MONTHLY_USD, "5")]);
        burn(&kv, &b, &t, 1_000, 1000, start, start + 2 * MIN);
        let user = format!("budget:v1:{user}");
        assert_eq!(scopes_written(&kv), ["budget:v1:global", &user[..]]);
        // A free answer writes nothing, not even the gateway's.
        let kv = Spy::default();
        let r = record_spend(&kv, &Budgets::default(), &t, 0, &Health::default(), start);
        assert!(r.unwrap().is_empty() && kv.hook.written.lock().unwrap().is_empty());
    }

    #[test]
    fn a_steady_burn_predicts_the_run_out_and_idleness_forgets_it() {
        for kv in [MemKv::default(), MemKv::redis_like()] {
            let b = budgets(&[
                (TENANT_BUDGET_DAILY_USD, "5"),
                (TENANT_BUDGET_MONTHLY_USD, "100"),
            ]);
            let t = Tenant::of(&digest("k"), None, None);
            let day = utc(2026, 11, 25, 0, 0);
            // No spend: no rate, no prediction.
            let h = read(&kv, &b, &t, day + 3 * H);
            assert!(h.budgets.iter().all(|x| x.predicted_runout_ms.is_none()));
            assert!(!h.lean_free());
            // $0.50 an hour (a $0.0125 answer every 90 s) for 3 hours: $1.50 spent, $3.50 left,
            // gone at 10:00 at that pace; the EWMA (95% warmed up) says a little later.
            burn(&kv, &b, &t, 12_500, 90_000, day, day + 3 * H);
            let now = day + 3 * H;
            let h = read(&kv, &b, &t, now);
            let d = find(&h, &t.id, Period::Day);
            assert_eq!(d.spent_micro_usd, 1_500_000);
            let per_hour = d.rate_micro_usd_per_s * 3600.0;
            assert!((450_000.0..500_000.0).contains(&per_hour), "{per_hour}");
            let runout = d.predicted_runout_ms.unwrap();
            assert!(
                (day + 10 * H..day + 11 * H).contains(&runout),
                "{}",
                rfc3339(runout)
            );
            assert!(h.lean_free());
            // The month's slow rate has barely warmed up: $100 is not predicted to run out.
            let m = find(&h, &t.id, Period::Month);
            assert!(m.rate_micro_usd_per_s < d.rate_micro_usd_per_s / 5.0);
            assert_eq!(m.predicted_runout_ms, None);
            // Five idle hours later the fast rate has decayed: no run-out before midnight.
            let later = now + 5 * H;
            let h = read(&kv, &b, &t, later);
            let d = find(&h, &t.id, Period::Day);
            assert!(d.rate_micro_usd_per_s * 3600.0 < 5_000.0);
            assert_eq!(d.predicted_runout_ms, None);
            assert!(!h.lean_free(), "{h:?}");
        }
    }

    #[test]
    fn folds_are_exact_about_what_was_spent_since() {
        let e = Ewma::start(10, 1_000, 0);
        // An hour at 1 µ$/s in one fold: α = 1 − 1/e.
        let f = e.fold(10, 1_000 + 3_600, H);
        assert!((f.rate - (1.0 - (-1.0f64).exp())).abs() < 1e-9, "{f:?}");
        assert_eq!((f.at_ms, f.day_total_at, f.day), (H, 4_600, 10));
        // A stale total (a late writer) never moves the mark back.
        let g = f.fold(10, 2_000, H + MIN);
        assert_eq!(g.day_total_at, 4_600);
        assert!(g.rate < f.rate);
        // A new day: what was spent since is the new day's total.
        let n = f.fold(11, 360, H + 360_000);
        assert_eq!((n.day, n.day_total_at), (11, 360));
        assert!(n.rate > f.rate * 0.9);
        // A clock behind the record changes nothing.
        assert_eq!(f.fold(10, 9_999, H - 1), f);
        assert_eq!(f.fold(9, 9_999, H + MIN), f);
        // Unreadable records start again.
        assert_eq!(Ewma::decode(Some(b"{\"rate\":-1}")), None);
        assert_eq!(Ewma::decode(Some(&f.encode())), Some(f));
    }

    #[test]
    fn raw_user_ids_and_emails_are_never_written() {
        for kv in [Spy::default(), redis_spy()] {
            let b = budgets(&[(USER_BUDGET_DAILY_USD, "1"), (TENANT_BUDGET_DAILY_USD, "5")]);
            let key = "fr-secret-client-key";
            let t = Tenant::of(&digest(key), None, Some("Alice.Liddell@Example.org"));
            let now = utc(2026, 11, 25, 8, 0);
            for i in 0..5 {
                let seen = read(&kv, &b, &t, now + i * MIN);
                record_spend(&kv, &b, &t, 1234, &seen, now + i * MIN).unwrap();
            }
            let written = kv.hook.written.lock().unwrap();
            assert!(written.len() > 10);
            let full = digest(key);
            for (k, v) in written.iter() {
                let text = format!("{k} {}", String::from_utf8_lossy(v)).to_lowercase();
                for secret in ["alice", "liddell", "example", key, &full[10..]] {
                    assert!(!text.contains(secret), "{secret} in {text}");
                }
            }
            assert!(written
                .iter()
                .any(|(k, _)| k.contains(t.user.as_deref().unwrap())));
        }
    }

    #[test]
    fn daily_quota_run_out_at_todays_pace() {
        let start = utc(2026, 11, 25, 0, 0);
        let reset = start + DAY_MS;
        // 20 of 50 by 06:00: 50 at 15:00.
        assert_eq!(
            rpd_runout(20, 50, start, reset, start + 6 * H),
            Some(start + 15 * H)
        );
        // 10 of 50 by 06:00: 50 at 30:00, after the reset.
        assert_eq!(rpd_runout(10, 50, start, reset, start + 6 * H), None);
        // Spent, or nothing yet.
        assert_eq!(
            rpd_runout(50, 50, start, reset, start + 6 * H),
            Some(start + 6 * H)
        );
        assert_eq!(rpd_runout(0, 50, start, reset, start + 6 * H), None);
        // Five requests in the first five minutes judged as five an hour: 50 at 09:05, not 00:50.
        assert_eq!(
            rpd_runout(5, 50, start, reset, start + 5 * MIN),
            Some(start + 5 * MIN + 9 * H)
        );
        let f = QuotaForecast::new(20, 50, start, reset, start + 6 * H);
        assert_eq!(
            serde_json::to_value(f).unwrap(),
            serde_json::json!({"used": 20, "limit": 50, "resets_at_ms": reset,
                               "predicted_runout_ms": start + 15 * H})
        );
    }

    #[test]
    fn health_serialises_as_documented() {
        let b = budgets(&[(TENANT_BUDGET_DAILY_USD, "5")]);
        let t = Tenant::of(&digest("k"), None, None);
        let now = utc(2026, 11, 25, 12, 0);
        let day_value = |spent: u64| {
            let v = MONEY.encode(Period::Day.window(now), spent);
            Some(v.to_le_bytes().to_vec())
        };
        let values = [
            day_value(12_300_000),
            None,
            None,
            day_value(4_100_000),
            None,
            None,
        ];
        let h = Health::read(&b, &t, &values, now);
        let j = serde_json::to_value(&h).unwrap();
        assert_eq!(j["lean_free_at"], 0.25);
        assert_eq!(j["lean_free"], true);
        assert_eq!(j["budgets"].as_array().unwrap().len(), 4, "{j}");
        // The gateway first, always, here without a limit: spend only.
        let global = &j["budgets"][0];
        assert_eq!(global["scope"], "global");
        assert_eq!(global["level"], "global");
        assert_eq!(global["period"], "day");
        assert_eq!(global["spent_micro_usd"], 12_300_000);
        for field in [
            "limit_micro_usd",
            "remaining_micro_usd",
            "fraction_left",
            "predicted_runout_ms",
        ] {
            assert!(global[field].is_null(), "{field}: {global}");
        }
        assert_eq!(global["exhausted"], false);
        assert_eq!(global["resets_at"], "2026-11-26T00:00:00Z");
        assert_eq!(j["budgets"][1]["period"], "month");
        let day = &j["budgets"][2];
        assert_eq!(day["scope"], t.id.as_str());
        assert_eq!(day["level"], "tenant");
        assert_eq!(day["period"], "day");
        assert_eq!(day["limit_micro_usd"], 5_000_000);
        assert_eq!(day["spent_micro_usd"], 4_100_000);
        assert_eq!(day["remaining_micro_usd"], 900_000);
        assert_eq!(day["fraction_left"], 0.18);
        assert_eq!(day["exhausted"], false);
        assert_eq!(day["resets_at"], "2026-11-26T00:00:00Z");
        assert_eq!(day["resets_at_ms"], utc(2026, 11, 26, 0, 0));
        assert_eq!(day["rate_micro_usd_per_s"], 0.0);
        assert!(day["predicted_runout_ms"].is_null());
        let month = &j["budgets"][3];
        assert_eq!(month["period"], "month");
        assert!(month["limit_micro_usd"].is_null() && month["fraction_left"].is_null());
        assert_eq!(j.as_object().unwrap().len(), 3, "{j}");
    }

    /// Store failures surface; nothing is retried silently.
    #[test]
    fn store_errors_are_returned() {
        struct Down;
        impl testing::Hook for Down {
            fn before(&self, _: &'static str, _: &str, _: &MemKv) -> KvResult<()> {
                Err(KvError("down".into()))
            }
        }
        let broken = testing::Hooked::new(MemKv::default(), Down);
        let b = budgets(&[(BUDGET_DAILY_USD, "1")]);
        let t = Tenant::of(&digest("k"), None, None);
        assert!(record_spend(&broken, &b, &t, 5, &Health::default(), 0).is_err());
    }
}
