//! What training adds to the frozen base: LoRA adapters on the linear layers ([`lora`]), started
//! from the base's own factors with PiSSA/OLoRA ([`lora_init`]), DoRA's magnitudes over them ([`dora`]) and the scalar head of a reward model ([`score`]). The base
//! itself lives in [`super::model`].

pub mod dora;
pub mod lora;
pub mod lora_init;
pub mod score;
