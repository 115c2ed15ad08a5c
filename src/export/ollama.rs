//! An Ollama Modelfile for a tuned model: `FROM` the base (or the merged GGUF), `ADAPTER` the LoRA
//! GGUF, a `TEMPLATE` in Ollama's Go template syntax that renders conversations as the training
//! chat template did, one `PARAMETER stop` per end-of-turn token, and `SYSTEM` when the training
//! data used one fixed system prompt (or the template injects a default one). The chat template is
//! recognised by rendering probe conversations with it and with each family tunekit ships
//! (ChatML/Qwen, Llama 3, Mistral, Gemma, Phi-3, Zephyr); one it cannot match is an error, not a
//! guess. Go's text/template has no trim: where a family's Jinja trims message contents (Llama 3,
//! Gemma), contents with surrounding whitespace render with it.

use crate::record::Message;
use crate::template::chat::{ChatTemplate, CHAT_TEMPLATES};
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Chatml,
    Llama3,
    Mistral,
    Gemma,
    Phi3,
    Zephyr,
}

pub const FAMILIES: [Family; 6] =
    [Family::Chatml, Family::Llama3, Family::Mistral, Family::Gemma, Family::Phi3, Family::Zephyr];

/// Marks a system prompt's place in a probe render.
const MARK: &str = "\u{E000}";

impl Family {
    /// The built-in Jinja template of the family (`templates/chat/`).
    pub fn builtin(self) -> &'static str {
        let name = match self {
            Family::Chatml => "chatml",
            Family::Llama3 => "llama3",
            Family::Mistral => "mistral",
            Family::Gemma => "gemma",
            Family::Phi3 => "phi3",
            Family::Zephyr => "zephyr",
        };
        CHAT_TEMPLATES.iter().find(|(n, _)| *n == name).expect("shipped").1
    }

    /// Ollama's TEMPLATE for the family; `eos` is the tokenizer's eos text. The BOS is left to the
    /// tokenizer (llama.cpp adds it when the GGUF says add_bos_token).
    pub fn go_template(self, eos: &str) -> String {
        // The first message, when it is the system one, is taken out of the loop (Mistral, Gemma).
        const SYSTEM_FIRST: &str = "{{ $system := \"\" }}{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role \"system\") }}{{ $system = $m.Content }}{{ end }}{{ end }}{{ $first := true }}";
        const LOOP: &str = "{{ range $i, $m := .Messages }}{{ if not (and (eq $i 0) (eq $m.Role \"system\")) }}";
        match self {
            Family::Chatml => {
                "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n".into()
            }
            Family::Llama3 => "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n".into(),
            Family::Phi3 => "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n".into(),
            Family::Zephyr => format!("{{{{ range .Messages }}}}<|{{{{ .Role }}}}|>\n{{{{ .Content }}}}{eos}\n{{{{ end }}}}<|assistant|>\n"),
            Family::Mistral => format!(
                "{SYSTEM_FIRST}{LOOP}{{{{ if eq $m.Role \"user\" }}}}[INST] {{{{ if and $first $system }}}}{{{{ $system }}}}\n\n{{{{ end }}}}{{{{ $m.Content }}}} [/INST]{{{{ else if eq $m.Role \"assistant\" }}}} {{{{ $m.Content }}}}{eos}{{{{ end }}}}{{{{ $first = false }}}}{{{{ end }}}}{{{{ end }}}}"
            ),
            Family::Gemma => format!(
                "{SYSTEM_FIRST}{LOOP}<start_of_turn>{{{{ if eq $m.Role \"assistant\" }}}}model{{{{ else }}}}{{{{ $m.Role }}}}{{{{ end }}}}\n{{{{ if and $first $system }}}}{{{{ $system }}}}\n\n{{{{ end }}}}{{{{ $m.Content }}}}<end_of_turn>\n{{{{ $first = false }}}}{{{{ end }}}}{{{{ end }}}}<start_of_turn>model\n"
            ),
        }
    }

    /// The end-of-turn tokens the model stops at.
    pub fn stops(self, eos: &str) -> Vec<String> {
        match self {
            Family::Chatml => vec!["<|im_end|>".into()],
            Family::Llama3 => vec!["<|eot_id|>".into()],
            Family::Gemma => vec!["<end_of_turn>".into()],
            Family::Phi3 => vec!["<|end|>".into()],
            Family::Mistral | Family::Zephyr => vec![eos.to_string()],
        }
    }
}

fn conv(turns: &[(&str, &str)]) -> Vec<Message> {
    turns.iter().map(|(r, c)| Message::new(r, c.to_string())).collect()
}

/// Conversations that tell the families apart (all end with a user turn: Ollama renders them with
/// the generation prompt).
fn probes() -> Vec<Vec<Message>> {
    vec![
        conv(&[("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Who are you?")]),
        conv(&[("system", "Be brief."), ("user", "What is 2+2?")]),
        conv(&[("user", "Hi there"), ("assistant", "Hello!"), ("user", "Who are you?")]),
    ]
}

/// The family of a chat template, and the default system prompt it writes when a conversation has
/// none (SmolLM2's, for one); an error when it renders like none of them.
pub fn recognise(source: &str, specials: &Map<String, Value>) -> Result<(Family, Option<String>)> {
    let tpl = ChatTemplate::new("training", source, specials.clone())?;
    let render = |t: &ChatTemplate, m: &[Message]| t.render(m, None, true).map_err(|e| anyhow::anyhow!("{e:#}"));
    let mine: Vec<String> = probes().iter().map(|p| render(&tpl, p)).collect::<Result<_>>()?;
    for f in FAMILIES {
        let fam = ChatTemplate::new("family", f.builtin(), specials.clone())?;
        let theirs: Vec<String> = probes().iter().map(|p| render(&fam, p)).collect::<Result<_>>()?;
        if theirs[..2] != mine[..2] {
            continue;
        }
        if theirs[2] == mine[2] {
            return Ok((f, None));
        }
        // Without a system message: the family's render with a system prompt the template injects?
        let mut with = probes()[2].clone();
        with.insert(0, Message::new("system", MARK.to_string()));
        let marked = render(&fam, &with)?;
        let (pre, post) = marked.split_once(MARK).expect("the mark is rendered");
        if mine[2].len() >= pre.len() + post.len() && mine[2].starts_with(pre) && mine[2].ends_with(post) {
            let default = mine[2][pre.len()..mine[2].len() - post.len()].to_string();
            with[0] = Message::new("system", default.clone());
            if render(&fam, &with)? == mine[2] {
                return Ok((f, Some(default)));
            }
        }
    }
    bail!(
        "the training chat template renders like none of the families tunekit translates to Ollama's template \
         (ChatML/Qwen, Llama 3, Mistral, Gemma, Phi-3, Zephyr); prepare with one of them (--template NAME) or write \
         the Modelfile's TEMPLATE by hand"
    )
}

/// The system prompt of a decoded training sequence, for the family's layout.
pub fn system_of(decoded: &str, family: Family, specials: &Map<String, Value>) -> Result<Option<String>> {
    let fam = ChatTemplate::new("family", family.builtin(), specials.clone())?;
    let marked = fam
        .render(&conv(&[("system", MARK), ("user", "\u{E001}")]), None, false)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let (pre, rest) = marked.split_once(MARK).expect("the mark is rendered");
    let after = rest.split('\u{E001}').next().unwrap_or("");
    let Some(body) = decoded.strip_prefix(pre) else { return Ok(None) };
    Ok(body.find(after).filter(|_| !after.is_empty()).map(|end| body[..end].to_string()))
}

/// The Modelfile text.
pub fn modelfile(from: &str, adapter: Option<&str>, family: Family, eos: &str, system: Option<&str>) -> String {
    let mut m = String::from(
        "# Written by tunekit export ollama: the training chat template in Ollama's syntax, its stop tokens.\n",
    );
    m.push_str(&format!("FROM {from}\n"));
    if let Some(a) = adapter {
        m.push_str(&format!("ADAPTER {a}\n"));
    }
    m.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n", family.go_template(eos)));
    for s in family.stops(eos) {
        m.push_str(&format!("PARAMETER stop \"{s}\"\n"));
    }
    if let Some(s) = system {
        m.push_str(&format!("SYSTEM \"\"\"{s}\"\"\"\n"));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> Map<String, Value> {
        serde_json::from_value(serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"})).unwrap()
    }

    #[test]
    fn each_family_is_recognised_and_a_default_system_prompt_found() {
        for f in FAMILIES {
            assert_eq!(recognise(f.builtin(), &specials()).unwrap(), (f, None), "{f:?}");
        }
        let smol = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        assert_eq!(recognise(smol, &specials()).unwrap(), (Family::Chatml, Some("You are SmolLM.".into())));
        let alpaca = CHAT_TEMPLATES.iter().find(|(n, _)| *n == "alpaca").unwrap().1;
        assert!(recognise(alpaca, &specials()).unwrap_err().to_string().contains("none of the families"));
    }

    #[test]
    fn the_system_prompt_is_read_back_from_a_rendered_sequence() {
        let fam = ChatTemplate::new("f", Family::Mistral.builtin(), specials()).unwrap();
        let text =
            fam.render(&conv(&[("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello")]), None, false).unwrap();
        assert_eq!(system_of(&text, Family::Mistral, &specials()).unwrap().as_deref(), Some("Be kind."));
        let none = fam.render(&conv(&[("user", "Hi"), ("assistant", "Hello")]), None, false).unwrap();
        assert_eq!(system_of(&none, Family::Mistral, &specials()).unwrap(), None);
    }
}
