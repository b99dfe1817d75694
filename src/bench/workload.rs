//! What the benchmark sends: token counts (fixed or ranges), synthetic prompts of a requested
//! token count, sweep points, the turn schedule that interleaves targets, and Poisson arrivals.
//!
//! Everything here is a pure function of the seed, so two targets (and two runs) get the same
//! prompts in the same order.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A token count: fixed (`64`) or drawn uniformly per request from an inclusive range (`32..128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Span {
    pub min: u32,
    pub max: u32,
}

impl Span {
    pub fn fixed(n: u32) -> Self {
        Span { min: n, max: n }
    }

    fn draw(self, rng: &mut fastrand::Rng) -> u32 {
        rng.u32(self.min..=self.max)
    }
}

impl FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| -> Result<u32, String> {
            let n: u32 = t.trim().parse().map_err(|_| format!("'{t}' is not a token count"))?;
            if n == 0 {
                return Err("a token count must be at least 1".into());
            }
            Ok(n)
        };
        let span = match s.split_once("..") {
            Some((a, b)) => Span { min: parse(a)?, max: parse(b.trim_start_matches('='))? },
            None => Span::fixed(parse(s)?),
        };
        if span.min > span.max {
            return Err(format!("the range {s} is empty: its start is above its end"));
        }
        Ok(span)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

/// One point of the sweep: a closed loop of `n` concurrent streams, or open-loop arrivals at
/// `r` requests per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    Concurrency(u32),
    Rate(f64),
}

impl Point {
    /// The value on the plot's x axis.
    pub fn x(self) -> f64 {
        match self {
            Point::Concurrency(c) => c as f64,
            Point::Rate(r) => r,
        }
    }

    pub fn label(self) -> String {
        match self {
            Point::Concurrency(c) => format!("concurrency {c}"),
            Point::Rate(r) => format!("rate {r} req/s"),
        }
    }
}

/// Words that are one token each in the common BPE and SentencePiece vocabularies (with the
/// space before them). Prompts are random sequences of them, so that no two prompts share more
/// than a token or two of prefix: a server's prompt cache must not turn the benchmark into a
/// cache benchmark.
const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "foot",
    "boy",
    "age",
    "policy",
    "music",
    "market",
    "sense",
    "nation",
    "plan",
    "college",
    "interest",
    "death",
    "experience",
    "effect",
    "class",
    "control",
    "care",
    "field",
    "development",
    "role",
    "effort",
    "rate",
    "heart",
    "drug",
    "show",
    "leader",
    "light",
    "voice",
    "wife",
    "police",
    "mind",
    "price",
    "report",
    "decision",
    "son",
    "view",
    "relationship",
    "town",
    "road",
    "arm",
    "difference",
    "value",
    "building",
    "action",
    "model",
    "season",
    "society",
    "tax",
    "director",
    "position",
    "player",
    "record",
    "paper",
    "space",
    "ground",
    "form",
    "event",
    "official",
    "matter",
    "center",
    "couple",
    "site",
    "project",
    "activity",
    "star",
    "table",
    "need",
    "court",
    "oil",
    "situation",
    "cost",
    "industry",
    "figure",
    "street",
    "image",
    "phone",
    "data",
    "picture",
    "practice",
    "piece",
    "land",
    "product",
    "doctor",
    "wall",
    "patient",
    "worker",
    "news",
    "test",
    "movie",
    "north",
    "love",
    "support",
    "technology",
    "step",
    "baby",
    "computer",
    "type",
    "attention",
    "film",
    "tree",
    "source",
    "organization",
    "hair",
    "window",
    "evidence",
    "population",
    "site",
    "energy",
    "fire",
    "river",
    "summer",
    "garden",
    "blue",
    "green",
    "red",
    "small",
    "large",
    "good",
    "new",
    "old",
    "great",
    "high",
    "little",
    "long",
    "young",
    "important",
    "public",
    "bad",
    "same",
    "able",
    "early",
    "free",
    "strong",
    "clear",
    "simple",
    "open",
    "short",
    "whole",
    "real",
    "black",
    "white",
    "full",
    "special",
    "easy",
    "hard",
    "late",
    "human",
    "local",
    "sure",
    "major",
    "better",
    "common",
    "poor",
    "natural",
    "happy",
    "serious",
    "ready",
    "simply",
    "quickly",
    "often",
    "always",
    "never",
    "again",
    "almost",
    "later",
    "today",
    "together",
    "already",
    "enough",
    "perhaps",
    "usually",
    "probably",
    "make",
    "know",
    "take",
    "see",
    "come",
    "think",
    "look",
    "want",
    "give",
    "use",
    "find",
    "tell",
    "ask",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "keep",
    "begin",
    "help",
    "talk",
    "turn",
    "start",
    "run",
    "move",
    "live",
    "believe",
    "hold",
    "bring",
    "happen",
    "write",
    "provide",
    "sit",
    "stand",
    "lose",
    "pay",
    "meet",
    "include",
    "continue",
    "learn",
    "lead",
    "understand",
    "watch",
    "follow",
    "stop",
    "create",
    "speak",
    "read",
    "allow",
    "add",
    "spend",
    "grow",
    "open",
    "walk",
    "win",
    "offer",
    "remember",
    "consider",
    "appear",
    "buy",
    "wait",
    "serve",
    "die",
    "send",
    "expect",
    "build",
    "stay",
    "fall",
    "cut",
    "reach",
    "kill",
    "remain",
];

/// How many words make a prompt of a given token count: `tokens ≈ fixed + per_word × words`,
/// measured with the target's `/tokenize` when it has one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// `tokenize` (measured on the first target) or `assumed` (one token per word plus BOS).
    pub source: &'static str,
    pub per_word: f64,
    /// Tokens a prompt has besides its words (BOS, a chat template).
    pub fixed: f64,
}

impl Calibration {
    pub const ASSUMED: Calibration = Calibration { source: "assumed", per_word: 1.0, fixed: 1.0 };

    /// From the token counts of two texts of `short` and `long` words.
    pub fn measured(short: (usize, usize), long: (usize, usize)) -> Option<Calibration> {
        let (w1, t1) = (short.0 as f64, short.1 as f64);
        let (w2, t2) = (long.0 as f64, long.1 as f64);
        let per_word = (t2 - t1) / (w2 - w1);
        // A tokenizer that answers nonsense (or one that is not the model's) is not used.
        if !(0.2..=8.0).contains(&per_word) {
            return None;
        }
        Some(Calibration { source: "tokenize", per_word, fixed: (t1 - per_word * w1).max(0.0) })
    }

    fn words_for(&self, tokens: u32) -> usize {
        ((tokens as f64 - self.fixed) / self.per_word).round().max(1.0) as usize
    }
}

/// Texts of random words for calibration: `(words, text)` pairs of two lengths.
pub fn calibration_texts(seed: u64) -> [(usize, String); 2] {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xca11b);
    [64, 320].map(|n| (n, words(&mut rng, n)))
}

fn words(rng: &mut fastrand::Rng, n: usize) -> String {
    let mut text = String::with_capacity(n * 8);
    for i in 0..n {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[rng.usize(..WORDS.len())]);
    }
    text
}

/// One request of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub prompt: String,
    /// The prompt's size as asked for; the server's `usage.prompt_tokens` says what it became.
    pub prompt_tokens: u32,
    pub max_tokens: u32,
}

/// The request generator: a pure function of (seed, point, index).
#[derive(Debug, Clone)]
pub struct Workload {
    pub prompt_tokens: Span,
    pub max_tokens: Span,
    pub seed: u64,
    pub calibration: Calibration,
}

/// Index space of warm-up requests, apart from every sweep point's.
pub const WARMUP: usize = usize::MAX;

impl Workload {
    /// Request `index` of sweep point `point` (or of the warm-up, `point == WARMUP`). Every
    /// target gets the same job for the same (point, index).
    pub fn job(&self, point: usize, index: usize) -> Job {
        let mix =
            (point as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (index as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let mut rng = fastrand::Rng::with_seed(self.seed ^ mix);
        let prompt_tokens = self.prompt_tokens.draw(&mut rng);
        let max_tokens = self.max_tokens.draw(&mut rng);
        let prompt = words(&mut rng, self.calibration.words_for(prompt_tokens));
        Job { prompt, prompt_tokens, max_tokens }
    }
}

/// One turn of the schedule: a target runs requests `first..first + count` of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub point: usize,
    pub target: usize,
    pub round: usize,
    pub first: usize,
    pub count: usize,
}

/// How many rounds a point is cut into: with several targets, up to `turns` rounds of A, B, …
/// so that drift of a noisy machine hits every target alike; but never rounds smaller than
/// the concurrency, whose closed loop would then never fill. One target runs in one round
/// (every round boundary drains the loop, which costs throughput).
pub fn rounds(targets: usize, turns: usize, requests: usize, point: Point) -> usize {
    if targets <= 1 || requests == 0 {
        return 1;
    }
    let fill = match point {
        Point::Concurrency(c) => (c as usize).max(1),
        Point::Rate(_) => 1,
    };
    turns.min(requests / fill).max(1)
}

/// The order in which turns run for a fixed request count: for each point, rounds of every
/// target in the order given.
pub fn schedule(points: &[Point], targets: usize, turns: usize, requests: usize) -> Vec<Turn> {
    let mut out = Vec::new();
    for (p, &point) in points.iter().enumerate() {
        let rounds = rounds(targets, turns, requests, point);
        for round in 0..rounds {
            let first = requests * round / rounds;
            let count = requests * (round + 1) / rounds - first;
            for target in 0..targets {
                out.push(Turn { point: p, target, round, first, count });
            }
        }
    }
    out
}

/// Seconds from a turn's start at which its open-loop requests arrive: a Poisson process of
/// `rate` per second (exponential gaps), seeded per (point, round) so targets see the same gaps.
pub fn arrivals(rate: f64, count: usize, seed: u64, point: usize, round: usize) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xa771_7a15 ^ ((point as u64) << 32) ^ round as u64);
    let mut t = 0.0;
    (0..count)
        .map(|i| {
            // The first request goes at once; 1 - u is in (0, 1], so ln never sees 0.
            if i > 0 {
                t += -(1.0 - rng.f64()).ln() / rate;
            }
            t
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_fixed_and_ranges_and_refuse_nonsense() {
        assert_eq!("64".parse::<Span>().unwrap(), Span::fixed(64));
        assert_eq!("32..128".parse::<Span>().unwrap(), Span { min: 32, max: 128 });
        assert_eq!("32..=128".parse::<Span>().unwrap(), Span { min: 32, max: 128 });
        assert!("128..32".parse::<Span>().unwrap_err().contains("empty"));
        assert!("0".parse::<Span>().is_err());
        assert!("x".parse::<Span>().unwrap_err().contains("'x'"));
    }

    #[test]
    fn jobs_are_deterministic_per_point_and_index_and_differ_otherwise() {
        let w = Workload {
            prompt_tokens: Span { min: 10, max: 20 },
            max_tokens: Span::fixed(8),
            seed: 7,
            calibration: Calibration::ASSUMED,
        };
        assert_eq!(w.job(0, 3), w.job(0, 3));
        assert_ne!(w.job(0, 3).prompt, w.job(0, 4).prompt);
        assert_ne!(w.job(0, 3).prompt, w.job(1, 3).prompt);
        for i in 0..50 {
            let job = w.job(0, i);
            assert!((10..=20).contains(&job.prompt_tokens));
            // BOS + one token per word, as assumed.
            assert_eq!(job.prompt.split(' ').count() as u32, job.prompt_tokens - 1);
        }
    }

    #[test]
    fn calibration_inverts_the_measured_line() {
        // 1.5 tokens per word plus 3 fixed.
        let c = Calibration::measured((64, 99), (320, 483)).unwrap();
        assert!((c.per_word - 1.5).abs() < 1e-9 && (c.fixed - 3.0).abs() < 1e-9);
        assert_eq!(c.words_for(153), 100);
        assert!(Calibration::measured((64, 64), (320, 64)).is_none());
    }

    #[test]
    fn several_targets_alternate_within_each_point_and_one_target_runs_in_one_round() {
        let points = [Point::Concurrency(1), Point::Concurrency(2)];
        let order: Vec<(usize, usize, usize)> =
            schedule(&points, 2, 4, 4).iter().map(|t| (t.point, t.target, t.count)).collect();
        assert_eq!(
            order,
            [(0, 0, 1), (0, 1, 1), (0, 0, 1), (0, 1, 1), (0, 0, 1), (0, 1, 1), (0, 0, 1), (0, 1, 1)]
                .into_iter()
                .chain([(1, 0, 2), (1, 1, 2), (1, 0, 2), (1, 1, 2)])
                .collect::<Vec<_>>()
        );
        let single = schedule(&points, 1, 4, 10);
        assert_eq!(single.len(), 2);
        assert!(single.iter().all(|t| t.count == 10 && t.first == 0));
        // Uneven splits cover every request once.
        let uneven = schedule(&[Point::Concurrency(1)], 2, 3, 10);
        let covered: usize = uneven.iter().filter(|t| t.target == 0).map(|t| t.count).sum();
        assert_eq!(covered, 10);
    }

    #[test]
    fn poisson_arrivals_have_the_requested_mean_rate() {
        let a = arrivals(4.0, 4001, 1, 0, 0);
        assert_eq!(a[0], 0.0);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let rate = 4000.0 / a[4000];
        assert!((3.7..4.3).contains(&rate), "{rate}");
        assert_eq!(a, arrivals(4.0, 4001, 1, 0, 0));
    }
}
