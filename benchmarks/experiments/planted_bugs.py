"""Plant known bugs in the step one at a time and check that the fast tests catch each (run from anywhere)."""
import subprocess, sys, shutil, os
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PLANTS = [
 ("remove key chaining", [("src/lowgear/cache/prefix.py", "prev = page_key(prev, tokens[start : start + page_size])", "prev = page_key(None, tokens[start : start + page_size])"),
                          ("src/lowgear/cache/pages.py", "key = page_key(self.keys[-1] if self.keys else None, tokens[p * ps : (p + 1) * ps])", "key = page_key(None, tokens[p * ps : (p + 1) * ps])")]),
 ("min_new_tokens off by three", [("src/lowgear/engine/runner.py", "len(j.generated) < j.min_new_tokens and", "len(j.generated) < j.min_new_tokens - 3 and")]),
 ("min_new_tokens ignored", [("src/lowgear/engine/runner.py", "    if not early:\n", "    if True:\n")]),
 ("held-back text dropped at max_new_tokens", [("src/lowgear/engine/generator.py", "                text += self._drain(job)", "                self._drain(job)")]),
 ("top-p < -> <=", [("src/lowgear/engine/sampler.py", "keep &= mass_before < top_p", "keep &= mass_before <= top_p")]),
 ("slot shifted by one", [("src/lowgear/attention/metadata.py", "slots.append(table[p // page_size] * page_size + p % page_size)", "slots.append(table[p // page_size] * page_size + p % page_size + 1)")]),
 ("causal mask off by one", [("src/lowgear/attention/eager.py", "mask = kpos <= qpos\n", "mask = kpos < qpos + 2\n")]),
 ("sliding window off by one", [("src/lowgear/attention/sdpa.py", "mask &= j[None, None, :] > (qpos - window)[:, :, None]", "mask &= j[None, None, :] >= (qpos - window)[:, :, None]")]),
 ("borrower reads before writer computed", [("src/lowgear/engine/scheduler.py", "                return entry[0] is job\n", "                return True\n")]),
]
tests = sys.argv[1:] or ["tests/test_step_answers.py", "tests/test_scheduler.py"]
env = dict(os.environ, PYTHONPATH="src")
for name, edits in PLANTS:
    saved = {}
    for f, old, new in edits:
        saved.setdefault(f, open(f).read())
        s = open(f).read(); assert s.count(old) == 1, (name, f); open(f, "w").write(s.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           env=env, capture_output=True, text=True, timeout=600)
        last = [l for l in r.stdout.splitlines() if "FAILED" in l][:1]
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'} {last}", flush=True)
    finally:
        for f, s in saved.items(): open(f, "w").write(s)
