// Perplexity as llama.cpp computes it (node-llama-cpp 3.21.1, CPU): for each sequence, every
// position's next-token distribution from llama.cpp, and the log-probability of the next token
// where it is trained (labels != -100, the loss shifted by one as transformers does).
//
//   node perplexity.mjs MODEL.gguf SEQUENCES.json  ->  {"tokens": N, "nll": SUM, "perplexity": P}
//   SEQUENCES.json: [{"input_ids": [...], "labels": [...]}, ...]   (NODE_LLAMA_CPP_DIR as in eval.mjs)
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.NODE_LLAMA_CPP_DIR;
const entry = dir ? pathToFileURL(join(dir, "node_modules/node-llama-cpp/dist/index.js")).href : "node-llama-cpp";
const {getLlama} = await import(entry);
const [modelPath, seqPath] = process.argv.slice(2);
const sequences = JSON.parse(readFileSync(seqPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 1024, threads: 2});
let nll = 0, tokens = 0;
const seq = context.getSequence();
for (const s of sequences) {
    await seq.clearHistory();
    const ids = s.input_ids;
    const input = ids.map((t, i) => (i + 1 < ids.length && s.labels[i + 1] !== -100) ? [t, {generateNext: {probabilities: true}}] : t);
    const out = await seq.controlledEvaluate(input);
    for (let i = 0; i + 1 < ids.length; i++) {
        if (s.labels[i + 1] === -100) continue;
        const p = out[i].next.probabilities.get(s.labels[i + 1]) ?? 0;
        nll -= Math.log(Math.max(p, 1e-30));
        tokens++;
    }
}
console.log(JSON.stringify({tokens, nll, perplexity: Math.exp(nll / tokens)}));
await llama.dispose();
