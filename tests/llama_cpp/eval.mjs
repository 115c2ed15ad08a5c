// llama.cpp itself (the prebuilt binaries of node-llama-cpp 3.21.1, CPU) on a GGUF model, with an
// optional LoRA adapter GGUF: for each request, llama.cpp's own token ids of the text, the top
// next-token log-probabilities after the prompt ids, and the greedy continuation until an
// end-of-generation token. Used by tests/gguf_export.rs to check tunekit's GGUF exports.
//
//   node eval.mjs MODEL.gguf [ADAPTER.gguf|-] REQUESTS.json > RESULTS.json
//   REQUESTS.json: [{"text": "<|im_start|>user...", "ids": [1, 2, ...], "max_tokens": 24, "top": 20}]
//   (without "ids", the prompt is llama.cpp's own tokenization of "text")
// NODE_LLAMA_CPP_DIR: the directory where `npm i -E node-llama-cpp@3.21.1` was run.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.NODE_LLAMA_CPP_DIR;
const entry = dir ? pathToFileURL(join(dir, "node_modules/node-llama-cpp/dist/index.js")).href : "node-llama-cpp";
const {getLlama} = await import(entry);

const [modelPath, adapterPath, requestsPath] = process.argv.slice(2);
const requests = JSON.parse(readFileSync(requestsPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const lora = adapterPath && adapterPath !== "-" ? {adapters: [{filePath: adapterPath, scale: 1}]} : undefined;
const context = await model.createContext({contextSize: 1024, threads: 2, lora});
const results = [];
for (const r of requests) {
    const sequence = context.getSequence();
    const llamaIds = r.text === undefined ? null : Array.from(model.tokenize(r.text, true));
    const ids = r.ids ?? llamaIds;
    const input = ids.map((t, i) => i === ids.length - 1 ? [t, {generateNext: {probabilities: true}}] : t);
    const out = await sequence.controlledEvaluate(input);
    const probs = out[ids.length - 1].next.probabilities;
    const top = [...probs.entries()].slice(0, r.top ?? 20).map(([t, p]) => [t, Math.log(p)]);
    await sequence.clearHistory();
    const greedy = [];
    for await (const t of sequence.evaluate(ids, {temperature: 0, yieldEogToken: true})) {
        greedy.push(t);
        if (model.isEogToken(t) || greedy.length >= (r.max_tokens ?? 24)) break;
    }
    sequence.dispose();
    results.push({llama_ids: llamaIds, top, greedy});
}
console.log(JSON.stringify(results));
await llama.dispose();
