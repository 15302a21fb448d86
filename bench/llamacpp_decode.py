"""llama.cpp (llama-cpp-python) on the same GGUF file and prompts as bench/runtime_decode.rs.

Usage: python3 bench/llamacpp_decode.py MODEL.gguf PROMPTS.json MAX_TOKENS THREADS
Prints one JSON object per prompt: time to first token and decode ms/token, greedy.
"""
import json
import sys
import time

import llama_cpp

model, prompts_file, max_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
for p in json.load(open(prompts_file)):
    for _ in range(2):  # the first run warms caches; the second is reported
        llm.reset()
        start = time.perf_counter()
        first = None
        n = 0
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": p["prompt"]}], temperature=0.0, top_k=1,
            max_tokens=max_tokens, stream=True,
        ):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
    print(json.dumps({
        "name": p["name"],
        "ttft_ms": (first - start) * 1e3,
        "decode_ms_per_token": (end - first) * 1e3 / max(n - 1, 1),
        "chunks": n,
    }), flush=True)
