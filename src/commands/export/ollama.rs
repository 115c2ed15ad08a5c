//! `tunekit export ollama --adapter RUN --model BASE.gguf --out DIR`: the adapter GGUF (or with
//! `--merge` the merged model GGUF) and a Modelfile whose TEMPLATE, stop tokens and SYSTEM match
//! the training data, so `ollama create NAME -f DIR/Modelfile` runs the model as it was trained.

use super::gguf::{training_shards, GgufOptions, GgufSummary};
use crate::commands::Summary;
use crate::export::ollama::{modelfile, recognise, system_of, Family};
use crate::output::AtomicFile;
use crate::pack::shards::{list_shards, read_rows};
use crate::tokenize::TokenizerInfo;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

pub struct OllamaOptions {
    /// What to export; `out` is the directory for the GGUF file and the Modelfile.
    pub export: GgufOptions,
}

#[derive(Debug, Serialize)]
pub struct OllamaSummary {
    pub command: &'static str,
    pub modelfile: String,
    pub family: Family,
    pub stops: Vec<String>,
    pub system: Option<String>,
    /// Where SYSTEM came from: "data" (one fixed system prompt in every training sequence),
    /// "template" (the default the chat template writes), or why there is none.
    pub system_from: String,
    pub gguf: GgufSummary,
}

/// The system prompts of the training sequences (None for a sequence without one), read back
/// from the first tokens of each.
fn data_systems(
    dir: &Path,
    tok: &TokenizerInfo,
    family: Family,
    m: &crate::pack::manifest::Manifest,
) -> Result<BTreeSet<Option<String>>> {
    let mut seen = BTreeSet::new();
    for f in list_shards(dir, "train")? {
        for r in read_rows(&f)? {
            let mut at = 0usize;
            for &l in &r.seq_lengths {
                let end = at + (l as usize).min(512);
                let ids: Vec<u32> = r.input_ids[at..end].iter().map(|&t| t as u32).collect();
                let text = tok.tokenizer.decode(&ids, false).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
                seen.insert(system_of(&text, family, &m.tokenizer.special_tokens)?);
                at += l as usize;
                if seen.len() > 1 {
                    return Ok(seen);
                }
            }
        }
    }
    Ok(seen)
}

pub fn run(opts: &OllamaOptions) -> Result<OllamaSummary> {
    let o = &opts.export;
    if o.model.extension().is_none_or(|e| e != "gguf") {
        bail!(
            "{}: Ollama runs GGUF files; give the GGUF base the adapter was trained on (for a Hugging Face base, \
             convert it with llama.cpp's convert_hf_to_gguf.py first)",
            o.model.display()
        );
    }
    let Some(adapter) = o.adapter.as_deref() else {
        bail!("export ollama writes a LoRA run's adapter beside its GGUF base: give the run as --adapter");
    };
    let Some((data, manifest, Some(template))) = training_shards(adapter, o.data.as_deref())? else {
        bail!(
            "{}: the training shards (and their chat template) were not found; pass --data SHARDS",
            adapter.display()
        );
    };
    let specials = &manifest.tokenizer.special_tokens;
    let (family, default_system) = recognise(&template, specials)?;
    let eos = specials.get("eos_token").and_then(|v| v.as_str()).unwrap_or("</s>").to_string();
    let tok = TokenizerInfo::load(Path::new(&manifest.tokenizer.path))
        .with_context(|| format!("the shards' tokenizer {} (to read their system prompts)", manifest.tokenizer.path))?;
    let systems = data_systems(&data, &tok, family, &manifest)?;
    let (system, system_from) = match (systems.len(), systems.iter().next().cloned().flatten(), default_system) {
        (1, Some(s), _) => (Some(s), "data".to_string()),
        (1, None, Some(d)) => (Some(d), "template".to_string()),
        (1, None, None) => (None, "none: the data has no system prompt".to_string()),
        (_, _, d) => {
            let from = if d.is_some() {
                "template (the data's system prompts vary)"
            } else {
                "none: the data's system prompts vary"
            };
            (d, from.to_string())
        }
    };
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    let file = if o.merge { "model.gguf" } else { "adapter.gguf" };
    let gguf = super::gguf::run(&GgufOptions {
        adapter: Some(adapter.to_path_buf()),
        model: o.model.clone(),
        out: o.out.join(file),
        ty: o.ty,
        merge: o.merge,
        data: Some(data),
    })?;
    let base = std::fs::canonicalize(&o.model)?.display().to_string();
    let (from, adapter) = if o.merge { (format!("./{file}"), None) } else { (base, Some(format!("./{file}"))) };
    let text = modelfile(&from, adapter.as_deref(), family, &eos, system.as_deref());
    let path = o.out.join("Modelfile");
    let mut f = AtomicFile::create(&path)?;
    f.write_all(text.as_bytes())?;
    f.commit()?;
    Ok(OllamaSummary {
        command: "export ollama",
        modelfile: path.display().to_string(),
        stops: family.stops(&eos),
        family,
        system,
        system_from,
        gguf,
    })
}

impl Summary for OllamaSummary {
    fn print_human(&self) {
        println!("wrote {} ({:?} template, stop {:?})", self.modelfile, self.family, self.stops);
        match &self.system {
            Some(s) => println!("  SYSTEM from the {}: {s:?}", self.system_from),
            None => println!("  no SYSTEM ({})", self.system_from),
        }
        println!("  {}", self.gguf.out);
        println!("  run it: ollama create NAME -f {} && ollama run NAME", self.modelfile);
    }
}
