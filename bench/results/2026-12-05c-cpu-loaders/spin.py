import os, time
os.sched_setaffinity(0, [1])
def delay():
    with open(f"/proc/self/schedstat") as f: return int(f.read().split()[1])/1e9
def steal():
    with open("/proc/stat") as f:
        for l in f:
            if l.startswith("cpu1 "): return int(l.split()[8])/os.sysconf("SC_CLK_TCK")
c0,d0,w0,s0=time.process_time(),delay(),time.perf_counter(),steal()
x=0
while time.perf_counter()-w0<5: x+=1
c1,d1,w1,s1=time.process_time(),delay(),time.perf_counter(),steal()
w=w1-w0
print(f"util {(c1-c0)/w:.2f} runq {(d1-d0)/w:.2f} steal(cpu1) {(s1-s0)/w:.2f}")
