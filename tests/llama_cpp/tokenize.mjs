// llama.cpp's own tokenizer (the prebuilt binaries of node-llama-cpp 3.21.1) on a GGUF's vocabulary:
// the token ids of each text, special tokens parsed as in a rendered chat template, no BOS added.
// Used by tests/gguf_tokenizers.rs to check tunekit's GGUF tokenizers token for token.
//
//   node tokenize.mjs MODEL.gguf TEXTS.json > IDS.json      (TEXTS.json: ["text", ...])
// NODE_LLAMA_CPP_DIR: the directory where `npm i -E node-llama-cpp@3.21.1` was run.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.NODE_LLAMA_CPP_DIR;
const entry = dir ? pathToFileURL(join(dir, "node_modules/node-llama-cpp/dist/index.js")).href : "node-llama-cpp";
const {getLlama} = await import(entry);

const [modelPath, textsPath] = process.argv.slice(2);
const texts = JSON.parse(readFileSync(textsPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath, vocabOnly: true});
const out = texts.map((t) => Array.from(model.tokenize(t, true)));
process.stdout.write(JSON.stringify(out));
await model.dispose();
await llama.dispose();
