"""torch.compile against eager for the CoordLSTM cell's elementwise chain (issue 14): one 80 x 16,384 block of
gates to the new cell and hidden state, as the fast path computes it (in place, tanh as 2 sigmoid(2x) - 1), as
plain eager ops, and compiled by inductor. Prints the compile time, the median time of each and the difference.

    python benchmarks/compile_vs_eager.py     # about 10 s (needs a C++ compiler for inductor)
"""
import time, torch
torch.set_num_threads(1)
hd, B = 20, 16384
def cell(gates, c_old):
    i = torch.sigmoid(gates[:hd]); f = torch.sigmoid(gates[hd:2*hd]); g = torch.tanh(gates[2*hd:3*hd]); o = torch.sigmoid(gates[3*hd:])
    c = f * c_old + i * g
    return c, o * torch.tanh(c)
def eager_inplace(gates, c_old, c, h):
    gates[:2*hd].sigmoid_(); gates[2*hd:3*hd].mul_(2).sigmoid_().mul_(2).sub_(1); gates[3*hd:].sigmoid_()
    torch.mul(gates[hd:2*hd], c_old, out=c).addcmul_(gates[:hd], gates[2*hd:3*hd])
    h.copy_(c).mul_(2).sigmoid_().mul_(2).sub_(1).mul_(gates[3*hd:])
t0 = time.time(); cc = torch.compile(cell); g0 = torch.randn(4*hd, B); c0 = torch.randn(hd, B); cc(g0, c0); print("compile s", round(time.time()-t0, 1))
c = torch.empty(hd, B); h = torch.empty(hd, B)
for name, fn in [("eager (tanh_)", lambda: cell(g0, c0)), ("eager in place (sigmoid tanh)", lambda: eager_inplace(g0.clone(), c0, c, h)), ("compiled", lambda: cc(g0, c0))]:
    fn(); ts = []
    for _ in range(30):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    print(name, f"{1e3*sorted(ts)[15]:.3f} ms per (80 x {B}) block")
a, b = cell(g0, c0); x, y = cc(g0, c0); print("max diff compiled vs eager", float((a-x).abs().max()), float((b-y).abs().max()))
