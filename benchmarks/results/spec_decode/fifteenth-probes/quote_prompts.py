"""How much of SmolLM2's greedy answer copies the passage, per phrasing of the quote task."""
import sys, json
from pathlib import Path
sys.path.insert(0, "/work/main")
from ember import LLM, SamplingParams
from ember.bench.spec import passage, CODE
DATA = Path("/work/shared/data")
text = passage(DATA)
P = {
 "A_current": f"Repeat the following text exactly, word for word.\n\n{text}",
 "B_after": f"{text}\n\nRepeat the text above exactly, word for word.",
 "C_quotes": f'Here is a passage:\n\n"""\n{text}\n"""\n\nQuote the passage above in full, without changing anything.',
 "D_copy": f"Copy this text:\n\n{text}",
 "E_both": f"Repeat the following text exactly, word for word.\n\n{text}\n\nRepeat the text above exactly, word for word.",
 "F_transcribe": f"Transcribe the following text exactly as written, from the first word to the last.\n\nText:\n{text}",
}
llm = LLM(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct", show_progress=False)
tok = llm.get_tokenizer()
for name, msg in P.items():
    ids = llm.encode_chat([{"role": "user", "content": msg}])
    out = llm.generate(ids, SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)[0].outputs[0].token_ids
    out = list(out)
    pset = set(tuple(ids[i:i+4]) for i in range(len(ids)-3))
    copied = 0
    for i in range(len(out)):
        g = tuple((list(ids) + out[:i+1])[-4:])
        copied += g in pset
    first_break = next((i for i in range(3, len(out)) if tuple(out[i-3:i+1]) not in pset), len(out))
    print(json.dumps({"prompt": name, "out_tokens": len(out), "copied_4gram_frac": round(copied/len(out),3),
                      "copied_run_from_start": first_break}), flush=True)
    print("   ", repr(tok.decode(out)[:200]), "...", repr(tok.decode(out)[-150:]), flush=True)
