//! Loss masks: what the model learns from, per --loss mode, on real tokenizers and templates.

mod common;

use tunekit::record::{Conversation, Message};
use tunekit::template::chat::ChatTemplate;
use tunekit::tokenize::{LossMode, Sample, TokenizerInfo, Tokenizing};

fn qwen3() -> TokenizerInfo {
    TokenizerInfo::load(&common::root().join("datasets/tokenizers/qwen3")).unwrap()
}

fn own(tok: &TokenizerInfo) -> ChatTemplate {
    ChatTemplate::new("tokenizer", tok.chat_template.as_ref().unwrap(), tok.specials.clone()).unwrap()
}

/// The trained tokens, decoded, one string per contiguous trained segment.
fn trained_segments(tok: &TokenizerInfo, s: &Sample) -> Vec<String> {
    let mut segs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &l) in s.input_ids.iter().zip(&s.labels) {
        if l != -100 {
            assert_eq!(l as u32, id, "a label equals its token id");
            cur.push(id);
        } else if !cur.is_empty() {
            segs.push(tok.tokenizer.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        segs.push(tok.tokenizer.decode(&cur, false).unwrap());
    }
    segs
}

fn multi_turn() -> Conversation {
    let mut m = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "What is 2+2?"),
        Message::new("assistant", "4."),
        Message::new("user", "And 3+3?"),
        Message::new("assistant", "6."),
        Message::new("user", "And 4+4?"),
        Message::new("assistant", "8."),
    ];
    m[4].weight = Some(0);
    Conversation::new("t:1".into(), m)
}

#[test]
fn assistant_mode_trains_answers_and_end_of_turn_only() {
    let tok = qwen3();
    let tpl = own(&tok);
    let tk = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant };
    let s = tk.sample(&multi_turn()).unwrap();
    let segs = trained_segments(&tok, &s);
    // Turn 2 has weight 0; the last turn carries Qwen3's empty think block, which the model emits.
    assert_eq!(segs, vec!["4.<|im_end|>".to_string(), "<think>\n\n</think>\n\n8.<|im_end|>".to_string()]);
    for prompt in ["What is 2+2?", "Be brief.", "6."] {
        assert!(segs.iter().all(|s| !s.contains(prompt)), "{prompt} must not be trained");
    }
}

#[test]
fn last_and_all_modes() {
    let tok = qwen3();
    let tpl = own(&tok);
    let mut conv = multi_turn();
    conv.messages[4].weight = None;
    let last = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Last }.sample(&conv).unwrap();
    assert_eq!(trained_segments(&tok, &last), vec!["<think>\n\n</think>\n\n8.<|im_end|>".to_string()]);
    let all = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::All }.sample(&conv).unwrap();
    assert_eq!(all.trained(), all.len());
}

#[test]
fn empty_mask_is_rejected_with_a_reason() {
    let tok = qwen3();
    let tpl = own(&tok);
    let mut conv = multi_turn();
    for m in conv.messages.iter_mut() {
        if m.role == "assistant" {
            m.weight = Some(0);
        }
    }
    let err = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant }.sample(&conv).unwrap_err();
    assert_eq!(err.0, "empty_loss_mask");
}

#[test]
fn mistral_template_trains_answer_and_eos() {
    let tok = TokenizerInfo::load(&common::root().join("tests/fixtures/tokenizers/mistral")).unwrap();
    let tpl = ChatTemplate::builtin_or_file("mistral", tok.specials.clone()).unwrap();
    let tk = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant };
    let mut conv = multi_turn();
    conv.messages[4].weight = None;
    let s = tk.sample(&conv).unwrap();
    let segs = trained_segments(&tok, &s);
    assert_eq!(segs.len(), 3);
    assert!(segs[0].trim() == "4.</s>" && segs[2].trim() == "8.</s>", "{segs:?}");
    assert_eq!(s.input_ids[0], 1, "one BOS at the start");
    assert_eq!(s.input_ids.iter().filter(|&&t| t == 1).count(), 1, "BOS not doubled");
}

#[test]
fn llama3_template_trains_eot_id() {
    let Some(p) = common::asset("llama3_1/package/models") else { return };
    let tok = TokenizerInfo::load(&p).unwrap();
    let tpl = own(&tok);
    let s = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant }.sample(&multi_turn()).unwrap();
    assert_eq!(trained_segments(&tok, &s), vec!["4.<|eot_id|>".to_string(), "8.<|eot_id|>".to_string()]);
}

#[test]
fn builtin_templates_render_and_mask() {
    let tok = qwen3();
    for (name, _) in tunekit::template::chat::CHAT_TEMPLATES {
        let tpl = ChatTemplate::builtin_or_file(name, tok.specials.clone()).unwrap();
        let tk = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant };
        let s = tk.sample(&multi_turn()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let segs = trained_segments(&tok, &s);
        assert_eq!(segs.len(), 2, "{name}: {segs:?}");
        assert!(segs[0].contains("4.") && segs[1].contains("8."), "{name}: {segs:?}");
    }
}
