//! Rows a rank of a sharded prepare sets aside. A conversation that duplicates an earlier row of the
//! rank's own share is a duplicate in the whole input too, so the rank does not tokenize it (one
//! process never tokenizes duplicates either). The one exception: in the whole input more than
//! `MAX_CHAIN` rows of other shares sharing its band keys can come between it and the row it
//! duplicates, and then the merge keeps it. The merge tokenizes such a row itself, with the
//! tokenizer and template the ranks recorded, loaded at the first one and checked against the
//! manifest.

use super::block::Tokenized;
use super::part::TokenizingRecord;
use crate::dedup::{DedupOptions, Deduper, Prepared, Verdict};
use crate::pack::manifest::Manifest;
use crate::record::Conversation;
use crate::template::chat::ChatTemplate;
use crate::tokenize::mask::SampleError;
use crate::tokenize::{Sample, TokenizerInfo, Tokenizing};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;

/// A rank's own duplicate index over the rows of its share, in its order.
pub struct OwnShare {
    deduper: Deduper,
    pub set_aside: u64,
}

impl OwnShare {
    pub fn new(opts: &DedupOptions) -> OwnShare {
        OwnShare { deduper: Deduper::new(opts.clone()), set_aside: 0 }
    }

    /// What each conversation of a batch needs for its duplicate decision, here and at the merge.
    pub fn prepare(&self, convs: &[&Conversation]) -> Vec<Option<Prepared>> {
        self.deduper.prepare_all(convs)
    }

    /// For each conversation of a batch (in order, with its prepared duplicate check): whether it
    /// is new to this share and so worth tokenizing.
    pub fn fresh(&mut self, convs: &[&Conversation], prepared: &[Option<Prepared>]) -> Vec<bool> {
        let fresh: Vec<bool> =
            convs.iter().zip(prepared).map(|(c, p)| self.deduper.decide(&c.id, p.clone()) == Verdict::Keep).collect();
        self.set_aside += fresh.iter().filter(|f| !**f).count() as u64;
        fresh
    }
}

/// The merge's tokenizer for the kept rows a rank set aside, loaded when the first one comes.
pub struct LateTokenizer<'a> {
    manifest: &'a Manifest,
    record: Option<&'a TokenizingRecord>,
    loaded: Option<(TokenizerInfo, ChatTemplate)>,
    /// Rows tokenized here.
    pub count: u64,
}

impl<'a> LateTokenizer<'a> {
    pub fn new(manifest: &'a Manifest, record: Option<&'a TokenizingRecord>) -> Self {
        LateTokenizer { manifest, record, loaded: None, count: 0 }
    }

    /// The kept conversations of a batch with their samples: a rank's, or one made here.
    pub fn samples(
        &mut self,
        kept: Vec<(Conversation, Option<Tokenized>)>,
    ) -> Result<Vec<(Conversation, Result<Sample, SampleError>)>> {
        let missing = kept.iter().filter(|(_, t)| t.is_none()).count() as u64;
        if missing > 0 && self.loaded.is_none() {
            self.loaded = Some(self.load()?);
        }
        self.count += missing;
        let tokenizing =
            self.loaded.as_ref().map(|(tok, template)| Tokenizing { tok, template, mode: self.manifest.loss });
        Ok(kept
            .into_par_iter()
            .map(|(c, t)| {
                let s = match t {
                    Some(t) => t.into_result(),
                    None => tokenizing.as_ref().expect("loaded for the rows without samples").sample(&c),
                };
                (c, s)
            })
            .collect())
    }

    fn load(&self) -> Result<(TokenizerInfo, ChatTemplate)> {
        let rec =
            self.record.context("a prepare part without its tokenizer sets no rows aside: the part is damaged")?;
        let (m, path) = (self.manifest, std::path::Path::new(&rec.tokenizer));
        let why = "the merge tokenizes the rows it keeps that a rank set aside as duplicates within its own share";
        let tok = TokenizerInfo::load(path).with_context(|| format!("{why}, with the ranks' tokenizer"))?;
        if tok.sha256 != m.tokenizer.sha256 || tok.specials != m.tokenizer.special_tokens {
            bail!(
                "{}: the tokenizer changed after the ranks ran ({why}): put back the one they used, or rerun the ranks",
                path.display()
            );
        }
        let template = ChatTemplate::new(&m.template.name, &rec.template, tok.specials.clone())?;
        if template.sha256 != m.template.sha256 {
            bail!("the parts' chat template is not the one their manifest names ({why}): rerun the ranks");
        }
        Ok((tok, template))
    }
}
