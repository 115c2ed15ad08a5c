//! The language rule: a conversation is identified by whatlang (trigram models of 69 languages,
//! the script first) over its prompt and answers together, and kept only when the language is one
//! of those asked for, identified at least as surely as asked (as datatrove's language filter keeps
//! a document by fastText's label and score).

use anyhow::{bail, Result};
use whatlang::Lang;

/// `--language eng,deu`: ISO 639-3 codes.
pub fn parse(codes: &[String]) -> Result<Vec<Lang>> {
    codes
        .iter()
        .map(|c| {
            let c = c.trim().to_lowercase();
            Lang::from_code(c.as_str()).ok_or_else(|| {
                let known: Vec<&str> = Lang::all().iter().map(|l| l.code()).collect();
                anyhow::anyhow!("--language {c}: not an ISO 639-3 code whatlang knows ({})", known.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() && !codes.is_empty() {
                bail!("--language: give at least one code");
            }
            Ok(v)
        })
}

/// Ok when `text` is in one of `allowed` with at least `min_confidence`; otherwise what was found.
pub fn check(text: &str, allowed: &[Lang], min_confidence: f64) -> Result<(), String> {
    let names = || allowed.iter().map(|l| l.code()).collect::<Vec<_>>().join(", ");
    match whatlang::detect(text) {
        None => Err(format!("no language identified; allowed: {}", names())),
        Some(info) if !allowed.contains(&info.lang()) => Err(format!(
            "identified as {} ({}, confidence {:.2}); allowed: {}",
            info.lang().code(),
            info.lang().eng_name(),
            info.confidence(),
            names()
        )),
        Some(info) if info.confidence() < min_confidence => Err(format!(
            "identified as {} with confidence {:.2}, under --min-language-confidence {min_confidence}",
            info.lang().code(),
            info.confidence()
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_allowed_language_and_rejects_others_and_unsure_text() {
        let eng = parse(&["eng".into()]).unwrap();
        let en = "Water the plants only when the top of the soil is dry, and give them bright indirect light.";
        let de = "Gieße die Pflanzen nur, wenn die Erde oben trocken ist, und stelle sie an einen hellen Ort.";
        assert!(check(en, &eng, 0.5).is_ok());
        let e = check(de, &eng, 0.5).unwrap_err();
        assert!(e.contains("identified as deu"), "{e}");
        assert!(check(de, &parse(&["eng".into(), "deu".into()]).unwrap(), 0.5).is_ok());
        assert!(check("ok 42", &eng, 0.5).is_err(), "too little text to be sure");
        assert!(parse(&["english".into()]).unwrap_err().to_string().contains("ISO 639-3"));
    }
}
