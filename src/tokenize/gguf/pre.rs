//! llama.cpp's BPE pre-tokenizers by the name a GGUF gives them (`tokenizer.ggml.pre`): the regular
//! expressions that split text into words before byte-level BPE, applied one after another (each
//! splits the pieces of the one before, keeping what it does not match), as llama.cpp's
//! `llm_tokenizer_bpe` lists them, and whether whole words found in the vocabulary skip the merges
//! (`ignore_merges`). The expressions are llama.cpp's (src/llama-vocab.cpp), which adapt each
//! family's tokenizer.json; a name not listed here is an error, never a silent default.

/// How a family splits text before BPE.
#[derive(Debug, Clone, Copy)]
pub struct PreTokenizer {
    /// The split expressions, in order.
    pub regexes: &'static [&'static str],
    /// A word that is one vocabulary token is that token, without merging.
    pub ignore_merges: bool,
}

/// The pre-tokenizer llama.cpp uses for `name`; an empty name is llama.cpp's default.
pub fn by_name(name: &str) -> Option<PreTokenizer> {
    let name = if name.is_empty() { "default" } else { name };
    let (regexes, ignore_merges) = match name {
        "default" => (DEFAULT, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => (LLAMA3, true),
        "minicpm5" => (MINICPM5, true),
        "deepseek-llm" => (DEEPSEEK_LLM, false),
        "deepseek-coder" => (DEEPSEEK_CODER, false),
        "deepseek-v3" => (DEEPSEEK3_LLM, false),
        "spark2_5" => (SPARK2_5, false),
        "youtu" => (YOUTU, true),
        "falcon" => (FALCON, false),
        "mpt" => (GPT2, false),
        "starcoder" => (STARCODER, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum"
        | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "exaone4" => (GPT2, false),
        "jais-2" => (JAIS2, false),
        "refact" => (STARCODER, false),
        "command-r" => (STARCODER, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => (QWEN2, false),
        "qwen35" => (QWEN35, false),
        "stablelm2" => (QWEN2, false),
        "olmo" => (GPT2, false),
        "dbrx" => (LLAMA3, false),
        "smaug-bpe" => (LLAMA3, false),
        "poro-chat" => (BLOOM, false),
        "chatglm-bpe" => (LLAMA3, false),
        "glm4" | "glm5" => (LLAMA3, true),
        "viking" => (VIKING, false),
        "jais" => (GPT2, false),
        "tekken" => (TEKKEN, true),
        "smollm" => (STARCODER, false),
        "codeshell" => (STARCODER, false),
        "bloom" => (BLOOM, false),
        "gpt3-finnish" => (BLOOM, false),
        "exaone" => (STARCODER, false),
        "exaone-moe" => (EXAONE_MOE, false),
        "minerva-7b" => (STARCODER, false),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => (GPT4O, false),
        "granite-embed-multi-97m" => (GRANITE_EMB_MULTI, true),
        "tiny_aya" | "cohere2moe" => (TINY_AYA, false),
        "trillion" => (GPT2, false),
        "granite-docling" => (GPT2, false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => (BAILINGMOE, false),
        "seed-coder" => (SEED_CODER, false),
        "hunyuan" => (QWEN2, false),
        "hunyuan-dense" => (DEEPSEEK3_LLM, false),
        "hy_v4" => (DEEPSEEK3_LLM, false),
        "joyai-llm" => (DEEPSEEK3_LLM, false),
        "ufakzeka" => (UFAKZEKA, false),
        "grok-2" => (QWEN2, false),
        "laguna" => (LAGUNA, false),
        "minimax-m2" => (GPT4O, false),
        "solar-open" => (QWEN2, false),
        "mellum2" => (STARCODER, false),
        _ => return None,
    };
    Some(PreTokenizer { regexes, ignore_merges })
}

/// Whether llama.cpp adds a BOS for this BPE pre-tokenizer when the file does not say
/// (`tokenizer.ggml.add_bos_token` absent): Llama 3's family, Tekken and Chameleon.
pub fn adds_bos(name: &str) -> bool {
    matches!(
        name,
        "llama3"
            | "llama-v3"
            | "llama-bpe"
            | "falcon3"
            | "falcon-h1"
            | "pixtral"
            | "midm-2.0"
            | "lfm2"
            | "jina-v5-nano"
            | "tekken"
            | "chameleon"
    )
}

/// Names llama.cpp knows whose splitting needs code of its own (or raw UTF-8 instead of GPT-2's
/// byte encoding); tunekit refuses them by name.
pub const NOT_YET: &[&str] =
    &["kimi-k2", "afmoe", "superbpe", "whitespace", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "chameleon"];

/// Every name [`by_name`] knows, for error messages.
pub const KNOWN: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "minicpm5",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "spark2_5",
    "youtu",
    "falcon",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "exaone4",
    "jais-2",
    "refact",
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "qwen35",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "exaone-moe",
    "minerva-7b",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "granite-embed-multi-97m",
    "tiny_aya",
    "cohere2moe",
    "trillion",
    "granite-docling",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "ufakzeka",
    "grok-2",
    "laguna",
    "minimax-m2",
    "solar-open",
    "mellum2",
];

// The distinct expression sets, each named after one family that uses it.
const BAILINGMOE: &[&str] = &[
    r##"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"##,
];
const BLOOM: &[&str] = &[r##" ?[^(\s|.,!?…。，、।۔،)]+"##];
const STARCODER: &[&str] =
    &[r##"\p{N}"##, r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##];
const DEEPSEEK3_LLM: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"[一-龥぀-ゟ゠-ヿ]+"##,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const DEEPSEEK_CODER: &[&str] =
    &[r##"[\r\n]"##, r##"\s?\p{L}+"##, r##"\s?\p{P}+"##, r##"[一-龥ࠀ-一가-퟿]+"##, r##"\p{N}"##];
const DEEPSEEK_LLM: &[&str] = &[
    r##"[\r\n]"##,
    r##"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"##,
    r##"\s?[!-/:-~！-／：-～‘-‟　-。]+"##,
    r##"\s+$"##,
    r##"[一-龥ࠀ-一가-퟿]+"##,
    r##"\p{N}+"##,
];
const DEFAULT: &[&str] = &[
    r##"[\p{P}\$\+<=>\^~\|]+"##,
    r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##,
    r##"\p{N}+"##,
    r##"[0-9][0-9][0-9]"##,
];
const EXAONE_MOE: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"##,
];
const FALCON: &[&str] = &[
    r##"[\p{P}\$\+<=>\^~\|`]+"##,
    r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##,
    r##"[0-9][0-9][0-9]"##,
];
const GPT2: &[&str] = &[r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##];
const GPT4O: &[&str] = &[
    r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const GRANITE_EMB_MULTI: &[&str] = &[
    r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const JAIS2: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"##,
];
const LAGUNA: &[&str] = &[
    r##"[^\n]+|[\n]+"##,
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const LLAMA3: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const MINICPM5: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const QWEN2: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const QWEN35: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const SEED_CODER: &[&str] = &[
    r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const SPARK2_5: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"[一-龥぀-ゟ゠-ヿ]+"##,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
    r##"\p{N}"##,
];
const TEKKEN: &[&str] = &[
    r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const TINY_AYA: &[&str] = &[
    r##"\d{1,3}(?=(?:\d{3})*\b)"##,
    r##"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const UFAKZEKA: &[&str] = &[r##"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##];
const VIKING: &[&str] = &[r##" ?[^(\s|.,!?…。，、।۔،)]+"##, r##"\p{N}"##];
const YOUTU: &[&str] = &[
    r##"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+"##,
    r##"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
