"""CPU time of torch's OpenMP worker while the caller sleeps after one parallel bf16 F.linear (2 threads)."""
import os, time, torch, glob
torch.set_num_threads(2)
x = torch.randn(512, 4096, dtype=torch.bfloat16); w = torch.randn(4096, 4096, dtype=torch.bfloat16)
for _ in range(3): torch.nn.functional.linear(x, w)
me = os.getpid(); main = str(me)
def cpu():
    return {t.split("/")[-1]: int(open(t + "/schedstat").read().split()[0]) for t in glob.glob(f"/proc/{me}/task/*")}
for wait in (0.002, 0.01, 0.05, 0.2):
    torch.nn.functional.linear(x, w)
    a = cpu(); time.sleep(wait); b = cpu()
    busy = {k: round((b[k]-a.get(k,0))/1e6, 2) for k in b if k != main and b[k]-a.get(k,0) > 10000}
    print(f"sleep {wait*1e3:.0f} ms: worker CPU ms while the caller slept: {busy}")
