//! `tunekit train`: a LoRA/QLoRA adapter on prepared shards by the options' method (sft, dpo,
//! reward), PEFT output. The recipes live in `train::recipes`; this is their summary.

use super::Summary;
use crate::train::TrainSummary;

impl Summary for TrainSummary {
    fn print_human(&self) {
        println!(
            "trained {} step(s) ({}) in {:.1}s ({:.0} tokens/s, {:.1} {}/s)",
            self.steps, self.method, self.seconds, self.tokens_per_s, self.examples_per_s, self.unit
        );
        println!("  data:       {} {} for training, {} held out", self.examples, self.data_unit, self.eval_examples);
        println!(
            "  trainable parameters: {} of {} ({:.3}%)",
            self.trainable_params, self.total_params, self.trainable_percent
        );
        println!(
            "  base: {:.3} bytes/parameter ({:.3} in the projections); peak memory {:.0} MB on {}",
            self.base_bytes_per_param, self.projection_bytes_per_param, self.peak_memory_mb, self.device
        );
        println!("  memory:     {}", self.memory.describe());
        if let Some(g) = self.peak_gpu_memory_mb {
            println!("  GPU memory in use at most: {g:.0} MB");
        }
        if let (Some(a), Some(b)) = (self.first_loss, self.final_loss) {
            println!("  train loss: {a:.4} -> {b:.4}");
        }
        if let (Some(a), Some(b)) = (&self.first_eval, &self.final_eval) {
            for (k, v) in b {
                match a.get(k) {
                    Some(first) => println!("  eval {k}: {first:.4} -> {v:.4}"),
                    None => println!("  eval {k}: {v:.4}"),
                }
            }
        }
        match self.full {
            true => println!("  model:      {} (Hugging Face model directory, every weight trained)", self.out),
            false => println!("  adapter:    {}/adapter_model.safetensors (PEFT format)", self.out),
        }
        println!("  metrics:    {}", self.metrics);
        if let Some(p) = &self.plot {
            println!("  loss curve: {p}");
        }
        if let Some(r) = &self.report {
            println!("  report:     {r}");
        }
    }
}
