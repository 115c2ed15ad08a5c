//! What training adds to the frozen base: LoRA adapters on the linear layers ([`lora`]) and the
//! scalar head of a reward model ([`score`]). The base itself lives in [`super::model`].

pub mod lora;
pub mod score;
