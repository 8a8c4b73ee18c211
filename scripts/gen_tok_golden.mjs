// Dev-only: writes tests/fixtures/tok/qwen2_golden.jsonl, the expected token ids of the Qwen2 tokenizer for
// tests/unit/test_tokenizer.c, computed by an implementation independent of caprl: Hugging Face's JS port of
// `tokenizers` (tokenizers.js, the engine inside transformers.js). Not run by the tests or CI.
//
// Setup (the npm registry is enough; no Python needed):
//   npm install --prefix /tmp/tokjs @huggingface/tokenizers@0.2.0
//   node scripts/gen_tok_golden.mjs
//       [--tokenizers-js /tmp/tokjs/node_modules/@huggingface/tokenizers/dist/tokenizers.mjs]
//       [--tokenizer ../shared/data/qwen-tokenizer/tokenizer.json]
//       [--out tests/fixtures/tok/qwen2_golden.jsonl]
//
// Each output line: {"text", "ids", "decoded", "decoded_skip"} for an encode case (ids from encode with special
// tokens parsed, no BOS/EOS), or {"decode_ids", "decoded", "decoded_skip"} for a decode-only case (id sequences
// that form invalid UTF-8; the JS decoder is WHATWG TextDecoder, which substitutes maximal subparts exactly as
// Python's bytes.decode(errors="replace") and Rust's from_utf8_lossy do).
//
// Cases avoid two known, documented differences from the Rust reference that do not concern caprl:
// - tokenizers.js rewrites (?i:'s|...) to ASCII classes, while Oniguruma's case folding also lets 's match 'ſ
//   (U+017F); caprl follows Oniguruma (and PCRE2), so no case puts an apostrophe before ſ followed by letters.
// - Node's ICU may know a newer Unicode version than utf8proc; cases use only characters assigned long ago.

import fs from "fs";
import path from "path";
import { fileURLToPath, pathToFileURL } from "url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");

function arg(name, fallback) {
    const i = process.argv.indexOf(name);
    return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const jsPath = arg("--tokenizers-js", "/tmp/tokjs/node_modules/@huggingface/tokenizers/dist/tokenizers.mjs");
const tokPath = arg("--tokenizer", path.resolve(root, "../shared/data/qwen-tokenizer/tokenizer.json"));
const outPath = arg("--out", path.resolve(root, "tests/fixtures/tok/qwen2_golden.jsonl"));

const { Tokenizer } = await import(pathToFileURL(jsPath).href);
const tokJson = JSON.parse(fs.readFileSync(tokPath, "utf8"));
// clean_up_tokenization_spaces false as in Qwen's tokenizer_config.json (tokenizers.js defaults it to true).
const tok = new Tokenizer(tokJson, { clean_up_tokenization_spaces: false });

const added = tokJson.added_tokens.map((t) => t.content);

// Deterministic generator (xorshift32) for the random mixed strings.
let rngState = 0x12345678;
function rnd(n) {
    rngState ^= rngState << 13;
    rngState >>>= 0;
    rngState ^= rngState >>> 17;
    rngState ^= rngState << 5;
    rngState >>>= 0;
    return rngState % n;
}

const pools = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\u0085", "\u2028", "\u000b", "\u000c",
    ".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`\"",
    "'", "'s", "'T", "'re", "'VE", "'m", "'Ll", "'d",
    "éèêëàâäôöûüçñßøåæœ",
    "e\u0301", "a\u0308", "o\u0302", "\u0301", "\u0327",
    "中文字符测试我们的模型", "日本語のテキストカタカナ", "한국어텍스트",
    "العربية", "עברית", "हिन्दी", "ภาษาไทย", "Ελληνικά", "Русский",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "½", "²", "Ⅻ", "٣", "０１２",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<|im_start", "<|", "|>",
];

function randomMixed(nPieces) {
    let s = "";
    for (let i = 0; i < nPieces; i++) {
        const pool = pools[rnd(pools.length)];
        if (pool.length > 8 && rnd(2) === 0) {
            const chars = [...pool];
            const k = 1 + rnd(6);
            for (let j = 0; j < k; j++) s += chars[rnd(chars.length)];
        } else {
            s += pool;
        }
    }
    return s;
}

const cases = [
    // spec §5.5 test vectors
    "Hello world",
    " Hello world",
    // ASCII sentences
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "Tokenization is the first step; everything else builds on it!",
    "A",
    "",
    " ",
    "a",
    // code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "for (size_t i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "    indented line\n\t\ttabbed line\n  \t mixed\n",
    "x=>x**2; y != z && w <= 3 || !q",
    "#include <stdio.h>\n#define MAX(a, b) ((a) > (b) ? (a) : (b))\n",
    // whitespace runs
    "a  b   c    d",
    "trailing spaces   ",
    "\n\n\n",
    "line1\r\nline2\r\n\r\nline3",
    "spaces before digits   123",
    " \n ",
    "  \n  x",
    "\t\tx",
    "word\n\nword",
    "   ",
    "a \u00a0b",
    "\u3000full width space",
    "x\u2009y\u202fz",
    "nel\u0085line\u2028sep\u2029para",
    "\u000b\u000c",
    // numbers
    "12345",
    "3.14159 and 2,718,281",
    "Version 2.0.1 released on 2024-05-17 at 10:30",
    "0x1F 0b1010 1e-9",
    "Ⅻ ½ ² ٣٤ ०१२ 一二三",
    // contractions
    "I'm sure it's fine, isn't it? We're here, they've gone, I'll go, he'd say.",
    "DON'T SHOUT, IT'S LOUD. WE'RE TIRED. I'M OK. THEY'VE LEFT. YOU'LL SEE. SHE'D KNOW.",
    "'s 'T 're 'Ve 'M 'lL 'D",
    "rock'n'roll o'clock y'all 'tis",
    "''s '''",
    "students' books",
    // punctuation runs
    "Wait... what?!?! --- ***bold*** ___ ~~~",
    "(((nested))) [[brackets]] {{braces}}",
    "\"quoted\" 'single' `backtick` «guillemets» „low“",
    "...\n\n---\n",
    "!!!\r\n",
    "— – … · • ¶ § © ® ™",
    // CJK
    "我们今天去公园散步，天气非常好。",
    "日本語のテキストです。カタカナとひらがなを含みます。",
    "한국어 텍스트입니다. 안녕하세요!",
    "中文English混合text测试123",
    // emoji
    "I love it 😀😃😄",
    "👍🏽 thumbs up with skin tone",
    "family: 👨‍👩‍👧‍👦 and flag 🇯🇵🇺🇸",
    "❤️ heart with VS16, ☺︎ text style",
    "🧑🏿‍💻 technologist",
    // combining marks, NFC
    "cafe\u0301",
    "e\u0301\u0301",
    "\u0301 leading mark",
    "A\u030a vs \u212b vs \u00c5",
    "Hangul jamo: \u1100\u1161\u11a8",
    "compat ideograph \uf900",
    "q\u0307\u0323",
    // scripts
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Привет, мир! Ελληνικά.",
    "Tiếng Việt có dấu",
    // control characters
    "nul\u0000byte",
    "bell\u0007 esc\u001b[0m del\u007f",
    "soft\u00adhyphen zero\u200bwidth",
    // partial special-looking strings
    "<|im_start",
    "<|endoftext|",
    "<|im_end|",
    "<|",
    "|>",
    "<tool_call",
    "</tool_call",
    "<|im_start|",
    "<|<|im_start|>|>",
    "<||>",
    "<im_start>",
    // adjacent specials and specials in text
    "<|im_start|><|im_end|>",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n" +
        "<|im_start|>assistant\n",
    "text<|im_end|>more",
    " <|im_end|> ",
    "\n<|im_start|>\n",
    "e<|im_end|>\u0301",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe this image.",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|>",
    "<|repo_name|>caprl<|file_sep|>src/main.c<|fim_pad|>",
];
for (const a of added) {
    cases.push(a);
    cases.push(`before ${a} after`);
    cases.push(`x${a}y`);
}
cases.push(randomMixed(200));
cases.push(randomMixed(400));
for (let i = 0; i < 10; i++) cases.push(randomMixed(30));

// Decode-only cases: ids whose bytes are not valid UTF-8. Ids are looked up by token string in the byte-level
// alphabet (bytes_to_unicode), so the choice is readable: "\u00a4" is byte 0xA4, "\u00e4" byte 0xE4, ...
const vocab = tokJson.model.vocab;
function id(s) {
    if (!(s in vocab)) throw new Error(`no token ${s}`);
    return vocab[s];
}
const decodeCases = [
    [id("\u00a4")],                               // lone continuation byte 0xA4
    [id("\u00e4"), id("\u00b8")],                 // truncated 3-byte sequence E4 B8
    [id("a"), id("\u00e4"), id("\u00b8"), id("b")],
    [id("\u00e4"), id("\u00b8"), id("\u00e4")],   // truncated then a new lead byte
    [id("\u00f0"), id("\u0141"), id("a")],        // F0 9F (0x9F maps to U+0141) then 'a'
    [id("\u00ed"), id("\u0142")],                 // ED A0 (0xA0 maps to U+0142): surrogate range
    [id("\u00c0"), id("\u00af")],                 // C0 AF: overlong
    [id("\u00ff")],                               // FF: never valid
    // truncated, special, lone AD (0xAD maps to U+0143)
    [id("\u00e4"), id("\u00b8"), 151645, id("\u0143")],
];

fs.mkdirSync(path.dirname(outPath), { recursive: true });
const lines = [];
for (const text of cases) {
    const enc = tok.encode(text, { add_special_tokens: false });
    const ids = enc.ids;
    const decoded = ids.length ? tok.decode(ids, { skip_special_tokens: false }) : "";
    const decodedSkip = ids.length ? tok.decode(ids, { skip_special_tokens: true }) : "";
    if (decoded !== text.normalize("NFC") && !added.some((a) => text.includes(a))) {
        process.stderr.write(`note: round trip differs for ${JSON.stringify(text)}\n`);
    }
    lines.push(JSON.stringify({ text, ids, decoded, decoded_skip: decodedSkip }));
}
for (const ids of decodeCases) {
    lines.push(JSON.stringify({
        decode_ids: ids,
        decoded: tok.decode(ids, { skip_special_tokens: false }),
        decoded_skip: tok.decode(ids, { skip_special_tokens: true }),
    }));
}
fs.writeFileSync(outPath, lines.join("\n") + "\n");
process.stderr.write(`wrote ${lines.length} cases to ${outPath}\n`);
