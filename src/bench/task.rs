//! A task file: lm-evaluation-harness's task YAML, the subset local tasks use, read into a [`Task`]
//! (its documents loaded from local JSON, JSONL, CSV or Parquet files). Every key it does not know
//! how to honour is an error naming the file and line, never silently ignored.

pub use super::task_file::plain_text;
use super::task_file::Lines;
use super::task_scoring::{filters, generation, metrics, positive};
pub use super::task_scoring::{FilterPipeline, FilterStep, Generation, JudgeSpec, MetricSpec, OutputType};
use crate::ingest::read::{open_rows, ReadOptions};
use crate::ingest::rows::to_object;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One of `doc_to_text`, `doc_to_target`, `doc_to_choice`: a field of the document, a Jinja
/// template over its fields, a fixed index, or a fixed list of choices.
#[derive(Debug, Clone)]
pub enum Field {
    Column(String),
    Template(String),
    Index(i64),
    List(Vec<String>),
}

/// One document with where it came from (for errors).
#[derive(Debug, Clone)]
pub struct Doc {
    pub fields: Map<String, Value>,
    pub source: String,
    /// 1-based record number in its file.
    pub row: u64,
    pub line: Option<u64>,
}

impl Doc {
    /// "file line N" (or "row N" where the format has no lines).
    pub fn place(&self) -> String {
        match self.line {
            Some(l) => format!("{} line {l}", self.source),
            None => format!("{} row {}", self.source, self.row),
        }
    }
}

/// How few-shot examples are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// The first n of the few-shot split (lm-eval's `first_n`).
    FirstN,
    /// n drawn as Python's `random.Random(seed).sample` draws them (lm-eval's `default`).
    Random,
}

/// A task, ready to be turned into requests.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub file: PathBuf,
    pub output: OutputType,
    pub docs: Vec<Doc>,
    pub fewshot_docs: Vec<Doc>,
    /// The few-shot pool is the evaluation split itself (each document is kept out of its own shots).
    pub fewshot_is_eval: bool,
    pub doc_to_text: Field,
    pub doc_to_target: Field,
    pub doc_to_choice: Option<Field>,
    pub description: String,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub num_fewshot: usize,
    pub sampler: Sampler,
    pub metrics: Vec<MetricSpec>,
    pub generation: Generation,
    pub filters: Vec<FilterPipeline>,
    /// Answers generated per document (`repeats`; pass@k draws from them, the other metrics score the first).
    pub repeats: usize,
    /// Prompts already in tokens, one per document (held-out conversations of shards), instead of
    /// contexts built from `doc_to_text`.
    pub prompt_tokens: Option<Vec<Vec<u32>>>,
    /// The column names of the documents (a `doc_to_*` equal to one is that column).
    pub features: Vec<String>,
    /// The task file's text, to name the line of a key in errors.
    text: String,
}

/// Keys this reader honours; `IGNORED` are accepted and have no effect on local scoring.
const KNOWN: &[&str] = &[
    "task",
    "include",
    "dataset_path",
    "dataset_kwargs",
    "test_split",
    "validation_split",
    "training_split",
    "fewshot_split",
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "num_fewshot",
    "fewshot_config",
    "metric_list",
    "generation_kwargs",
    "filter_list",
    "repeats",
];
const IGNORED: &[&str] =
    &["tag", "group", "metadata", "dataset_name", "should_decontaminate", "doc_to_decontamination_query"];

impl Task {
    /// Reads a task file (and the files it `include`s), then its documents.
    pub fn load(file: &Path) -> Result<Task> {
        let (cfg, text) = read_config(file, 0)?;
        let t = Lines { file, text: &text };
        for key in cfg.keys() {
            if !KNOWN.contains(&key.as_str()) && !IGNORED.contains(&key.as_str()) {
                bail!(
                    "{}: `{key}` is not something tunekit bench can honour (it reads {}); remove it or port it \
                     to one of those keys",
                    t.at(key),
                    KNOWN.join(", ")
                );
            }
        }
        for py in ["process_docs", "process_results"] {
            if cfg.contains_key(py) {
                bail!("{}: `{py}` runs Python, which tunekit cannot; prepare the data beforehand", t.at(py));
            }
        }
        let name = match cfg.get("task") {
            Some(Value::String(s)) => s.clone(),
            _ => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let output = match str_key(&cfg, "output_type", &t)?.as_deref() {
            Some("multiple_choice") => OutputType::MultipleChoice,
            Some("generate_until") | None => OutputType::GenerateUntil,
            Some("loglikelihood") => OutputType::Loglikelihood,
            Some(other) => bail!(
                "{}: output_type `{other}` is not supported (multiple_choice, generate_until, loglikelihood)",
                t.at("output_type")
            ),
        };
        let splits = data_files(&cfg, file, &t)?;
        let split_of = |key: &str| -> Result<Option<String>> { str_key(&cfg, key, &t) };
        let eval_split = match (split_of("test_split")?, split_of("validation_split")?) {
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => bail!("{}: a task needs `test_split` or `validation_split` to evaluate on", file.display()),
        };
        let load_split = |split: &str, key: &str| -> Result<Vec<Doc>> {
            let files = splits.iter().find(|(s, _)| s == split).map(|(_, f)| f).ok_or_else(|| {
                anyhow!(
                    "{}: split `{split}` has no files in dataset_kwargs.data_files (it has {})",
                    t.at(key),
                    splits.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
                )
            })?;
            let mut docs = Vec::new();
            for f in files {
                docs.extend(read_docs(f)?);
            }
            Ok(docs)
        };
        let eval_key = if cfg.contains_key("test_split") { "test_split" } else { "validation_split" };
        let docs = load_split(&eval_split, eval_key)?;
        if docs.is_empty() {
            bail!("{}: split `{eval_split}` has no documents", t.at(eval_key));
        }
        let features: Vec<String> = docs[0].fields.keys().cloned().collect();

        let fewshot_cfg = cfg.get("fewshot_config").and_then(Value::as_object);
        let num_fewshot = match cfg.get("num_fewshot") {
            None | Some(Value::Null) => 0,
            Some(v) => {
                v.as_u64().ok_or_else(|| anyhow!("{}: num_fewshot must be a whole number", t.at("num_fewshot")))?
                    as usize
            }
        };
        let sampler = match fewshot_cfg.and_then(|f| f.get("sampler")).and_then(Value::as_str) {
            None | Some("default") => Sampler::Random,
            Some("first_n") => Sampler::FirstN,
            Some(other) => {
                bail!("{}: fewshot sampler `{other}` is not supported (first_n, default)", t.at("fewshot_config"))
            }
        };
        let fewshot_split = match split_of("fewshot_split")? {
            Some(s) => Some((s, "fewshot_split")),
            None => match (split_of("training_split")?, split_of("validation_split")?) {
                (Some(s), _) => Some((s, "training_split")),
                (None, Some(s)) => Some((s, "validation_split")),
                (None, None) => None,
            },
        };
        let (fewshot_docs, fewshot_is_eval) = match fewshot_split {
            Some((s, _)) if s == eval_split => (docs.clone(), true),
            Some((s, key)) => (load_split(&s, key)?, false),
            None => (docs.clone(), true),
        };

        let field = |key: &str| -> Result<Option<Field>> { field_key(&cfg, key, &features, &t) };
        let doc_to_text =
            field("doc_to_text")?.ok_or_else(|| anyhow!("{}: the task has no `doc_to_text`", file.display()))?;
        let doc_to_target =
            field("doc_to_target")?.ok_or_else(|| anyhow!("{}: the task has no `doc_to_target`", file.display()))?;
        let doc_to_choice = field("doc_to_choice")?;
        if output == OutputType::MultipleChoice && doc_to_choice.is_none() {
            bail!(
                "{}: output_type multiple_choice needs `doc_to_choice` (a column holding the list of choices, a \
                 template rendering one, or a list)",
                t.at("output_type")
            );
        }
        let text_key = |key: &str, default: &str| -> Result<String> {
            Ok(str_key(&cfg, key, &t)?.unwrap_or_else(|| default.to_string()))
        };
        let fewshot_delimiter = text_key("fewshot_delimiter", "\n\n")?;
        let repeats = positive(cfg.get("repeats"), "repeats", || t.at("repeats"))?;
        let metrics = metrics(&cfg, output, file, &t)?;
        if let Some(m) = metrics.iter().find(|m| m.name == "pass_at_k" && m.k > repeats) {
            bail!(
                "{}: pass_at_k with k {} needs `repeats` of {} or more answers per document (it is {repeats})",
                t.at("metric_list"),
                m.k,
                m.k
            );
        }
        let generation = generation(&cfg, &fewshot_delimiter, &t)?;
        if repeats > 1 && !generation.do_sample {
            eprintln!(
                "warning: {}: repeats {repeats} with greedy decoding gives the same answer {repeats} times; set \
                 generation_kwargs.do_sample: true and a temperature",
                t.at("repeats")
            );
        }
        let task = Task {
            name,
            file: file.to_path_buf(),
            output,
            docs,
            fewshot_docs,
            fewshot_is_eval,
            doc_to_text,
            doc_to_target,
            doc_to_choice,
            description: text_key("description", "")?,
            target_delimiter: text_key("target_delimiter", " ")?,
            generation,
            fewshot_delimiter,
            num_fewshot,
            sampler,
            metrics,
            filters: filters(&cfg, &t)?,
            repeats,
            prompt_tokens: None,
            features,
            text,
        };
        Ok(task)
    }

    /// A generation task over prompts already in tokens: documents with a `reference` answer (and the
    /// prompt's text as `context`), scored by `metrics`, answers up to `max_gen_toks` or a stop token.
    pub fn from_prompts(
        name: &str,
        source: &Path,
        prompts: Vec<Vec<u32>>,
        docs: Vec<Doc>,
        metrics: &[&str],
        max_gen_toks: usize,
    ) -> Task {
        Task {
            name: name.to_string(),
            file: source.to_path_buf(),
            output: OutputType::GenerateUntil,
            fewshot_docs: vec![],
            fewshot_is_eval: false,
            doc_to_text: Field::Column("context".into()),
            doc_to_target: Field::Column("reference".into()),
            doc_to_choice: None,
            description: String::new(),
            target_delimiter: String::new(),
            fewshot_delimiter: String::new(),
            num_fewshot: 0,
            sampler: Sampler::FirstN,
            metrics: metrics.iter().map(|m| MetricSpec { name: m.to_string(), k: 1, ..Default::default() }).collect(),
            generation: Generation {
                until: vec![],
                max_gen_toks,
                do_sample: false,
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            },
            filters: vec![FilterPipeline { name: "none".into(), steps: vec![FilterStep::TakeFirst] }],
            repeats: 1,
            prompt_tokens: Some(prompts),
            features: vec!["context".into(), "reference".into()],
            docs,
            text: String::new(),
        }
    }

    /// "file line N" of a top-level key, or the file.
    pub fn at(&self, key: &str) -> String {
        Lines { file: &self.file, text: &self.text }.at(key)
    }
}

/// The task file as JSON, its `include`s merged under it (the including file wins), and the text of
/// the including file.
fn read_config(file: &Path, depth: usize) -> Result<(Map<String, Value>, String)> {
    if depth > 8 {
        bail!("{}: `include` nests more than 8 deep (a cycle?)", file.display());
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read task file {}", file.display()))?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| {
        let at = e.location().map(|l| format!(" line {}", l.line())).unwrap_or_default();
        anyhow!("{}{at}: not valid YAML: {e}", file.display())
    })?;
    let json = to_json(yaml, file, &text)?;
    let Value::Object(mut cfg) = json else { bail!("{}: a task file is a mapping of keys", file.display()) };
    if let Some(inc) = cfg.remove("include") {
        let Value::String(inc) = inc else { bail!("{}: `include` names one file", file.display()) };
        let path = file.parent().unwrap_or(Path::new(".")).join(&inc);
        let (mut base, _) = read_config(&path, depth + 1).with_context(|| format!("included by {}", file.display()))?;
        base.extend(cfg);
        cfg = base;
    }
    Ok((cfg, text))
}

/// YAML to JSON; a `!function` tag (Python) is an error naming its line.
fn to_json(v: serde_yaml::Value, file: &Path, text: &str) -> Result<Value> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(s) => Value::Array(s.into_iter().map(|x| to_json(x, file, text)).collect::<Result<_>>()?),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let k = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => bail!("{}: a key must be text, found {other:?}", file.display()),
                };
                out.insert(k, to_json(v, file, text)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            let tag = t.tag.to_string();
            let line = text.lines().position(|l| l.contains(&tag)).map(|i| format!(" line {}", i + 1));
            bail!(
                "{}{}: `{tag}` calls Python, which tunekit cannot run; write it as a Jinja template over the \
                 document's fields, or prepare the data beforehand",
                file.display(),
                line.unwrap_or_default()
            )
        }
    })
}

fn str_key(cfg: &Map<String, Value>, key: &str, t: &Lines) -> Result<Option<String>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => bail!("{}: `{key}` must be text", t.at(key)),
    }
}

fn field_key(cfg: &Map<String, Value>, key: &str, features: &[String], t: &Lines) -> Result<Option<Field>> {
    Ok(match cfg.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if features.contains(s) => Some(Field::Column(s.clone())),
        Some(Value::String(s)) => Some(Field::Template(s.clone())),
        Some(Value::Number(n)) => {
            Some(Field::Index(n.as_i64().ok_or_else(|| anyhow!("{}: `{key}` must be a whole number", t.at(key)))?))
        }
        Some(Value::Array(a)) => Some(Field::List(a.iter().map(plain_text).collect())),
        Some(Value::Object(m)) => Some(Field::List(m.values().map(plain_text).collect())),
        Some(Value::Bool(_)) => bail!("{}: `{key}` must be a column, a template, a number or a list", t.at(key)),
    })
}

/// `dataset_path` + `dataset_kwargs.data_files` as (split, files); relative paths from the task
/// file's folder, else from the working directory (where lm-eval looks).
fn data_files(cfg: &Map<String, Value>, file: &Path, t: &Lines) -> Result<Vec<(String, Vec<PathBuf>)>> {
    match str_key(cfg, "dataset_path", t)?.as_deref() {
        Some("json" | "csv" | "parquet") => {}
        Some(other) => bail!(
            "{}: dataset_path `{other}` is a dataset on the Hugging Face hub, which this machine may not reach; use \
             `dataset_path: json` (or csv, parquet) with dataset_kwargs.data_files naming local files",
            t.at("dataset_path")
        ),
        None => bail!("{}: the task has no `dataset_path` (json, csv or parquet)", file.display()),
    }
    let files = cfg
        .get("dataset_kwargs")
        .and_then(|k| k.get("data_files"))
        .ok_or_else(|| anyhow!("{}: dataset_kwargs.data_files must name the local files", t.at("dataset_kwargs")))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let resolve = |v: &Value| -> Result<Vec<PathBuf>> {
        let names: Vec<&str> = match v {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => bail!("{}: data_files entries are file names", t.at("dataset_kwargs")),
        };
        names
            .into_iter()
            .map(|n| {
                let beside = dir.join(n);
                if beside.exists() {
                    return Ok(beside);
                }
                let here = PathBuf::from(n);
                if here.exists() {
                    return Ok(here);
                }
                bail!(
                    "{}: data file {n} is neither beside the task file nor in the working directory",
                    t.at("dataset_kwargs")
                )
            })
            .collect()
    };
    match files {
        Value::Object(m) => m.iter().map(|(s, v)| Ok((s.clone(), resolve(v)?))).collect(),
        other => Ok(vec![("train".to_string(), resolve(other)?)]),
    }
}

/// Every record of a data file as a document (a row that does not parse is an error with its line).
fn read_docs(path: &Path) -> Result<Vec<Doc>> {
    let (source, rows) = open_rows(path, &ReadOptions::default())?;
    let mut docs = Vec::new();
    for raw in rows {
        let raw = raw?;
        let (row, line) = (raw.row, raw.line);
        let fields = to_object(&source, raw).map_err(|r| {
            let at = line.map(|l| format!("line {l}")).unwrap_or(format!("row {row}"));
            anyhow!("{} {at}: {}", path.display(), r.detail)
        })?;
        docs.push(Doc { fields, source: path.display().to_string(), row, line });
    }
    Ok(docs)
}
