"""A persistent native thread pool for compiled kernels.

Compiled code calls

    void narch_parallel_for(ptr fn, ptr ctx, i64 n_tasks)      ; fn: void (ptr ctx, i64 task)

which runs tasks ``0 .. n_tasks-1`` over the pool's workers *and* the calling thread
(dynamic scheduling: the caller claims tasks from the front, workers from the back, one
compare-and-swap each) and returns when all tasks have finished.  ``install()`` compiles the pool (LLVM IR below, calling
pthread/futex from libc in-process -- no C compiler needed), starts the workers and
registers the symbol with ``llvmlite.binding.add_symbol`` so that every module MCJIT-loads
afterwards (including cached object files) resolves it.  So is ``i64 narch_num_threads()``:
the threads ``narch_parallel_for`` runs on now, the caller included (1 without workers).

Why it is built this way (measured on our 2-core machines): waking a sleeping thread costs
60-120 us, a pinned spinning worker answers in well under a microsecond, and two unpinned
threads are often packed onto one core.  So:

* workers are pinned to distinct allowed CPUs (worker k gets ``cpus[k]``; the caller is
  expected on ``cpus[0]``), spin on a generation counter for ``NEURAL_ARCH_SPIN_US``
  (default 200 us) after their last job, then sleep on a futex;
* the caller never waits for a worker that has not joined: a job is "open" while the
  caller works; workers join by incrementing an entry counter, and the caller, once every
  task is claimed, closes the job and waits only for the workers that joined.  A small job
  issued while the workers sleep therefore costs the caller one futex-wake syscall, not
  the 60-120 us wake-up;
* claiming from both ends keeps data where it was written: on two threads, the caller
  runs the first tasks of every job and the worker the last ones, so a kernel whose tasks
  split rows as the previous kernel's did reads the rows its own thread wrote (in its own
  L2) instead of half of them from the other core's; a thread that falls behind just
  claims fewer;
* one job record, guarded by a try-lock: a second concurrent caller (another Python
  thread) or a nested call from inside a task finds the pool busy and runs its tasks
  serially on its own thread -- never a deadlock, never an interleaved job record;
* ``NEURAL_ARCH_NUM_THREADS`` (default: number of allowed CPUs) counts the caller; 1 means
  no workers and a plain serial loop.

Process exit: an atexit hook stops the workers (bounded wait), and the code memory of the
pool is deliberately never freed, so a worker can never execute freed code even if it is
still returning when the interpreter tears down.  A forked child starts its own workers.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import sys
import threading
import time

import llvmlite.binding as llvm

from . import jit

SYMBOL = "narch_parallel_for"
THREADS_SYMBOL = "narch_num_threads"
MAX_WORKERS = 255

_OPEN = 1 << 40  # job_entry: bit 40 = job open, low bits = workers inside the job

_POOL_IR = r"""
; ---------------------------------------------------------------- shared state
; Every hot word sits alone in a 128-byte (two-line, adjacent-prefetch) block.
@job_fn    = internal global [16 x i64] zeroinitializer, align 128  ; [0]=fn [1]=ctx [2]=n [3]=MXCSR (x86)
@job_next  = internal global [16 x i64] zeroinitializer, align 128  ; next task to claim
@job_entry = internal global [16 x i64] zeroinitializer, align 128  ; OPEN bit | inside
@pool_gen  = internal global [32 x i32] zeroinitializer, align 128  ; futex word: job generation
@pool_sleepers = internal global [32 x i32] zeroinitializer, align 128
@pool_busy = internal global [32 x i32] zeroinitializer, align 128  ; try-lock of the job record
; config, written only by start/stop: [0]=nworkers [1]=spin_ns [2]=stop [3]=alive
; [4]=generation when the workers were started [5]=steer the caller off worker CPUs
; [6]=workers that are up
@pool_cfg  = internal global [16 x i64] zeroinitializer, align 128
@pool_cpus = internal global [256 x i32] zeroinitializer, align 128
; cpu_set_t bitmaps: the workers' CPUs, and where to move a caller found on one of them
@pool_worker_set = internal global [16 x i64] zeroinitializer, align 128
@pool_caller_set = internal global [16 x i64] zeroinitializer, align 128
@pool_name = internal constant [11 x i8] c"narch-pool\00"

declare i64 @syscall(i64, ...)
declare i32 @clock_gettime(i32, ptr)
declare i32 @sched_setaffinity(i32, i64, ptr)
declare i32 @sched_yield()
declare i32 @sched_getcpu()
declare i32 @sched_getaffinity(i32, i64, ptr)
declare i32 @pthread_create(ptr, ptr, ptr, ptr)
declare i32 @pthread_attr_init(ptr)
declare i32 @pthread_attr_destroy(ptr)
declare i32 @pthread_attr_setaffinity_np(ptr, i64, ptr)
declare i32 @pthread_attr_setdetachstate(ptr, i32)
declare i64 @pthread_self()
declare i32 @pthread_setname_np(i64, ptr)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
__PAUSE_DECL__
__ENV_DECL__

define internal void @pool_pause() alwaysinline {
  __PAUSE_CALL__
  ret void
}

define internal i64 @pool_now() {
  %ts = alloca { i64, i64 }, align 8
  %r = call i32 @clock_gettime(i32 1, ptr %ts)
  %sec = load i64, ptr %ts
  %nsp = getelementptr { i64, i64 }, ptr %ts, i64 0, i32 1
  %ns = load i64, ptr %nsp
  %s1 = mul i64 %sec, 1000000000
  %t = add i64 %s1, %ns
  ret i64 %t
}

; Claim tasks from the open job until none is left.  job_next packs the unclaimed range
; [front, back) as back << 32 | front: the caller claims from the front, workers from the
; back, so with two threads each runs the same half of every job's tasks (the rows it wrote
; in the previous kernel stay in its own cache) unless one of them falls behind.
define internal void @pool_run_tasks(ptr %fn, ptr %ctx, i64 %n, i1 %from_back) {
entry:
  %first = load atomic i64, ptr @job_next monotonic, align 8
  br label %claim
claim:
  %old = phi i64 [ %first, %entry ], [ %seen, %retry ], [ %after, %body ]
  %f = and i64 %old, 4294967295
  %b = lshr i64 %old, 32
  %more = icmp ult i64 %f, %b
  br i1 %more, label %try, label %done
try:
  %back1 = sub i64 %b, 1
  %i = select i1 %from_back, i64 %back1, i64 %f
  %step = select i1 %from_back, i64 -4294967296, i64 1
  %new = add i64 %old, %step
  %pair = cmpxchg ptr @job_next, i64 %old, i64 %new monotonic monotonic
  %seen = extractvalue { i64, i1 } %pair, 0
  %won = extractvalue { i64, i1 } %pair, 1
  br i1 %won, label %body, label %retry
retry:
  br label %claim
body:
  call void %fn(ptr %ctx, i64 %i)
  %after = load atomic i64, ptr @job_next monotonic, align 8
  br label %claim
done:
  ret void
}

define internal void @pool_serial(ptr %fn, ptr %ctx, i64 %n) {
entry:
  %any = icmp sgt i64 %n, 0
  br i1 %any, label %loop, label %done
loop:
  %i = phi i64 [ 0, %entry ], [ %next, %loop ]
  call void %fn(ptr %ctx, i64 %i)
  %next = add nuw nsw i64 %i, 1
  %again = icmp slt i64 %next, %n
  br i1 %again, label %loop, label %done
done:
  ret void
}

define void @narch_parallel_for(ptr %fn, ptr %ctx, i64 %n) {
entry:
  ; fewer than two tasks, or more than job_next's 32-bit halves hold: one thread
  %n1 = add i64 %n, -2
  %small = icmp ugt i64 %n1, 4294967293
  br i1 %small, label %serial, label %have_workers
have_workers:
  %nw = load atomic i64, ptr @pool_cfg monotonic, align 8
  %serp = getelementptr i64, ptr @pool_cfg, i64 7
  %ser = load atomic i64, ptr %serp monotonic, align 8
  %nw0 = icmp eq i64 %nw, 0
  %ser1 = icmp ne i64 %ser, 0
  %none = or i1 %nw0, %ser1
  br i1 %none, label %serial, label %trylock
trylock:
  %pair = cmpxchg ptr @pool_busy, i32 0, i32 1 acquire monotonic
  %locked = extractvalue { i32, i1 } %pair, 1
  br i1 %locked, label %publish, label %serial
serial:
  ; one thread: no workers, n < 2, pool busy (another caller), or nested inside a task
  call void @pool_serial(ptr %fn, ptr %ctx, i64 %n)
  ret void
publish:
  ; An unpinned caller that sits on a worker's CPU would share it with the spinning
  ; worker (the scheduler can take milliseconds to notice): move it for this call.
  %saved = alloca [16 x i64], align 8
  %steerp = getelementptr i64, ptr @pool_cfg, i64 5
  %steer = load atomic i64, ptr %steerp monotonic, align 8
  %maysteer = icmp ne i64 %steer, 0
  br i1 %maysteer, label %where, label %publish2
where:
  %mycpu = call i32 @sched_getcpu()
  %mycpu64 = zext i32 %mycpu to i64
  %mw = lshr i64 %mycpu64, 6
  %inrange = icmp ult i64 %mw, 16
  %mwc = select i1 %inrange, i64 %mw, i64 0
  %mwp = getelementptr i64, ptr @pool_worker_set, i64 %mwc
  %mword = load i64, ptr %mwp, align 8
  %mb = and i64 %mycpu64, 63
  %mbit = shl i64 1, %mb
  %mhit = and i64 %mword, %mbit
  %onworker0 = icmp ne i64 %mhit, 0
  %onworker = and i1 %onworker0, %inrange
  br i1 %onworker, label %move, label %publish2
move:
  %gs = call i32 @sched_getaffinity(i32 0, i64 128, ptr %saved)
  %gsok = icmp eq i32 %gs, 0
  br i1 %gsok, label %move2, label %publish2
move2:
  %ss = call i32 @sched_setaffinity(i32 0, i64 128, ptr @pool_caller_set)
  %moved0 = icmp eq i32 %ss, 0
  br label %publish2
publish2:
  %moved = phi i1 [ false, %publish ], [ false, %where ], [ false, %move ], [ %moved0, %move2 ]
  store atomic ptr %fn, ptr @job_fn monotonic, align 8
  %ctxp = getelementptr i64, ptr @job_fn, i64 1
  store atomic ptr %ctx, ptr %ctxp monotonic, align 8
  %np = getelementptr i64, ptr @job_fn, i64 2
  store atomic i64 %n, ptr %np monotonic, align 8
  ; the caller's floating-point environment (x86: MXCSR, e.g. flush-to-zero) for the tasks
  %envp = getelementptr i64, ptr @job_fn, i64 3
  __ENV_PUBLISH__
  %range = shl i64 %n, 32
  store atomic i64 %range, ptr @job_next monotonic, align 8
  %o = atomicrmw or ptr @job_entry, i64 __OPEN__ seq_cst
  %g = atomicrmw add ptr @pool_gen, i32 1 seq_cst
  %sl = load atomic i32, ptr @pool_sleepers seq_cst, align 4
  %anysleep = icmp ne i32 %sl, 0
  br i1 %anysleep, label %wake, label %run
wake:
  ; FUTEX_WAKE_PRIVATE, all sleepers
  %w = call i64 (i64, ...) @syscall(i64 202, ptr @pool_gen, i64 129, i64 2147483647)
  br label %run
run:
  call void @pool_run_tasks(ptr %fn, ptr %ctx, i64 %n, i1 false)
  ; every task is claimed: close the job, then wait for the workers that joined it
  %c = atomicrmw and ptr @job_entry, i64 __NOT_OPEN__ seq_cst
  br label %drain
drain:
  %k = phi i64 [ 0, %run ], [ %k1, %drain_wait ], [ %k1, %drain_yield ]
  %e = load atomic i64, ptr @job_entry acquire, align 8
  %inside = icmp ne i64 %e, 0
  br i1 %inside, label %drain_wait, label %finish
drain_wait:
  call void @pool_pause()
  %k1 = add i64 %k, 1
  %km = and i64 %k1, 4095
  %yield = icmp eq i64 %km, 0
  br i1 %yield, label %drain_yield, label %drain
drain_yield:
  ; a worker inside the job was preempted: let it run
  %y = call i32 @sched_yield()
  br label %drain
finish:
  store atomic i32 0, ptr @pool_busy release, align 4
  br i1 %moved, label %restore, label %return
restore:
  %rs = call i32 @sched_setaffinity(i32 0, i64 128, ptr %saved)
  br label %return
return:
  ret void
}

define internal ptr @pool_worker(ptr %arg) {
entry:
  %seen.addr = alloca i32, align 4
  %t0.addr = alloca i64, align 8
  %spins.addr = alloca i64, align 8
  %self = call i64 @pthread_self()
  %nm = call i32 @pthread_setname_np(i64 %self, ptr @pool_name)
  ; the generation when we were created (not now: a job may already have been published)
  %g0p = getelementptr i64, ptr @pool_cfg, i64 4
  %g0w = load atomic i64, ptr %g0p acquire, align 8
  %g0 = trunc i64 %g0w to i32
  store i32 %g0, ptr %seen.addr, align 4
  %readyp = getelementptr i64, ptr @pool_cfg, i64 6
  %rd = atomicrmw add ptr %readyp, i64 1 release
  br label %spin_start

spin_start:
  %t0 = call i64 @pool_now()
  store i64 %t0, ptr %t0.addr, align 8
  store i64 0, ptr %spins.addr, align 8
  br label %spin
spin:
  %g = load atomic i32, ptr @pool_gen acquire, align 4
  %s = load i32, ptr %seen.addr, align 4
  %changed = icmp ne i32 %g, %s
  br i1 %changed, label %got, label %spin_more
spin_more:
  call void @pool_pause()
  %c = load i64, ptr %spins.addr, align 8
  %c1 = add i64 %c, 1
  store i64 %c1, ptr %spins.addr, align 8
  %c1m = and i64 %c1, 63
  %check = icmp eq i64 %c1m, 0
  br i1 %check, label %check_time, label %spin
check_time:
  %now = call i64 @pool_now()
  %t0l = load i64, ptr %t0.addr, align 8
  %elapsed = sub i64 %now, %t0l
  %limp = getelementptr i64, ptr @pool_cfg, i64 1
  %limit = load atomic i64, ptr %limp monotonic, align 8
  %over = icmp sgt i64 %elapsed, %limit
  br i1 %over, label %sleep, label %spin
sleep:
  ; announce, re-check, then sleep (the caller bumps gen, then reads sleepers: one of
  ; the two always sees the other)
  %sa = atomicrmw add ptr @pool_sleepers, i32 1 seq_cst
  %g2 = load atomic i32, ptr @pool_gen seq_cst, align 4
  %s2 = load i32, ptr %seen.addr, align 4
  %same = icmp eq i32 %g2, %s2
  br i1 %same, label %futex_wait, label %woke
futex_wait:
  %s2x = zext i32 %s2 to i64
  ; FUTEX_WAIT_PRIVATE while gen == seen
  %fw = call i64 (i64, ...) @syscall(i64 202, ptr @pool_gen, i64 128, i64 %s2x, ptr null)
  br label %woke
woke:
  %sd = atomicrmw sub ptr @pool_sleepers, i32 1 seq_cst
  br label %spin_start

got:
  store i32 %g, ptr %seen.addr, align 4
  %stopp = getelementptr i64, ptr @pool_cfg, i64 2
  %stop = load atomic i64, ptr %stopp acquire, align 8
  %stopping = icmp ne i64 %stop, 0
  br i1 %stopping, label %exit, label %enter
enter:
  %e = atomicrmw add ptr @job_entry, i64 1 acq_rel
  %open = and i64 %e, __OPEN__
  %isopen = icmp ne i64 %open, 0
  br i1 %isopen, label %work, label %leave
work:
  %fn = load atomic ptr, ptr @job_fn monotonic, align 8
  %ctxp = getelementptr i64, ptr @job_fn, i64 1
  %ctx = load atomic ptr, ptr %ctxp monotonic, align 8
  %np = getelementptr i64, ptr @job_fn, i64 2
  %n = load atomic i64, ptr %np monotonic, align 8
  %envp = getelementptr i64, ptr @job_fn, i64 3
  __ENV_ADOPT__
  call void @pool_run_tasks(ptr %fn, ptr %ctx, i64 %n, i1 true)
  br label %leave
leave:
  %l = atomicrmw sub ptr @job_entry, i64 1 release
  br label %spin_start
exit:
  %alivep = getelementptr i64, ptr @pool_cfg, i64 3
  %a = atomicrmw sub ptr %alivep, i64 1 release
  ret ptr null
}

; Start nworkers workers; cpus[k] (k = 1..nworkers) is worker k's CPU.  Returns the
; number of workers started.
define i64 @narch_pool_start(i64 %nworkers, ptr %cpus, i64 %spin_ns) {
entry:
  %tid = alloca i64, align 8
  %attr = alloca [128 x i8], align 16
  %mask = alloca [16 x i64], align 8
  %limp = getelementptr i64, ptr @pool_cfg, i64 1
  store atomic i64 %spin_ns, ptr %limp monotonic, align 8
  %stopp = getelementptr i64, ptr @pool_cfg, i64 2
  store atomic i64 0, ptr %stopp release, align 8
  %alivep = getelementptr i64, ptr @pool_cfg, i64 3
  %gnow = load atomic i32, ptr @pool_gen seq_cst, align 4
  %gnoww = zext i32 %gnow to i64
  %g0p = getelementptr i64, ptr @pool_cfg, i64 4
  store atomic i64 %gnoww, ptr %g0p seq_cst, align 8
  %readyp = getelementptr i64, ptr @pool_cfg, i64 6
  store atomic i64 0, ptr %readyp seq_cst, align 8
  %any = icmp sgt i64 %nworkers, 0
  br i1 %any, label %loop, label %done
loop:
  %k = phi i64 [ 1, %entry ], [ %k1, %created ]
  %src = getelementptr i32, ptr %cpus, i64 %k
  %cpu = load i32, ptr %src, align 4
  %dst = getelementptr [256 x i32], ptr @pool_cpus, i64 0, i64 %k
  store i32 %cpu, ptr %dst, align 4
  %a = atomicrmw add ptr %alivep, i64 1 seq_cst
  %arg = inttoptr i64 %k to ptr
  ; created already pinned (a thread born on the caller's busy CPU may wait there for
  ; milliseconds before it can move itself) and detached
  call void @llvm.memset.p0.i64(ptr %mask, i8 0, i64 128, i1 false)
  %cpu64 = zext i32 %cpu to i64
  %word = lshr i64 %cpu64, 6
  %bit = and i64 %cpu64, 63
  %wptr = getelementptr i64, ptr %mask, i64 %word
  %onebit = shl i64 1, %bit
  store i64 %onebit, ptr %wptr, align 8
  %ai = call i32 @pthread_attr_init(ptr %attr)
  %aa = call i32 @pthread_attr_setaffinity_np(ptr %attr, i64 128, ptr %mask)
  %ad = call i32 @pthread_attr_setdetachstate(ptr %attr, i32 1)
  %rc = call i32 @pthread_create(ptr %tid, ptr %attr, ptr @pool_worker, ptr %arg)
  %ax = call i32 @pthread_attr_destroy(ptr %attr)
  %ok = icmp eq i32 %rc, 0
  br i1 %ok, label %created, label %failed
created:
  %k1 = add i64 %k, 1
  %more = icmp sle i64 %k1, %nworkers
  br i1 %more, label %loop, label %done
failed:
  %a2 = atomicrmw sub ptr %alivep, i64 1 seq_cst
  %started = sub i64 %k, 1
  store atomic i64 %started, ptr @pool_cfg release, align 8
  ret i64 %started
done:
  %n = phi i64 [ 0, %entry ], [ %nworkers, %created ]
  store atomic i64 %n, ptr @pool_cfg release, align 8
  ret i64 %n
}

; Ask every worker to exit (new calls run serially at once); returns immediately.
define void @narch_pool_stop() {
  store atomic i64 0, ptr @pool_cfg seq_cst, align 8
  %stopp = getelementptr i64, ptr @pool_cfg, i64 2
  store atomic i64 1, ptr %stopp seq_cst, align 8
  %g = atomicrmw add ptr @pool_gen, i32 1 seq_cst
  %w = call i64 (i64, ...) @syscall(i64 202, ptr @pool_gen, i64 129, i64 2147483647)
  ret void
}

define void @narch_pool_set_caller_steering(ptr %workers, ptr %caller, i64 %on) {
  call void @llvm.memcpy.p0.p0.i64(ptr @pool_worker_set, ptr %workers, i64 128, i1 false)
  call void @llvm.memcpy.p0.p0.i64(ptr @pool_caller_set, ptr %caller, i64 128, i1 false)
  %steerp = getelementptr i64, ptr @pool_cfg, i64 5
  store atomic i64 %on, ptr %steerp seq_cst, align 8
  ret void
}

; Snapshot for debugging: cfg[0..6], gen, sleepers, busy, entry, next
define void @narch_pool_state(ptr %out) {
  call void @llvm.memcpy.p0.p0.i64(ptr %out, ptr @pool_cfg, i64 56, i1 false)
  %g = load atomic i32, ptr @pool_gen monotonic, align 4
  %s = load atomic i32, ptr @pool_sleepers monotonic, align 4
  %b = load atomic i32, ptr @pool_busy monotonic, align 4
  %e = load atomic i64, ptr @job_entry monotonic, align 8
  %x = load atomic i64, ptr @job_next monotonic, align 8
  %o6 = getelementptr i64, ptr %out, i64 7
  %g64 = zext i32 %g to i64
  store i64 %g64, ptr %o6
  %o7 = getelementptr i64, ptr %out, i64 8
  %s64 = zext i32 %s to i64
  store i64 %s64, ptr %o7
  %o8 = getelementptr i64, ptr %out, i64 9
  %b64 = zext i32 %b to i64
  store i64 %b64, ptr %o8
  %o9 = getelementptr i64, ptr %out, i64 10
  store i64 %e, ptr %o9
  %o10 = getelementptr i64, ptr %out, i64 11
  store i64 %x, ptr %o10
  ret void
}

; Threads narch_parallel_for uses now, the caller included.
define i64 @narch_num_threads() {
  %nw = load atomic i64, ptr @pool_cfg monotonic, align 8
  %t = add i64 %nw, 1
  %serp = getelementptr i64, ptr @pool_cfg, i64 7
  %ser = load atomic i64, ptr %serp monotonic, align 8
  %one = icmp ne i64 %ser, 0
  %r = select i1 %one, i64 1, i64 %t
  ret i64 %r
}

; Calls run on their caller alone (the workers idle) while %on is nonzero: a program that
; finds its calls faster that way (runtime/program.py, ThreadChoice).
define void @narch_pool_set_serial(i64 %on) {
  %serp = getelementptr i64, ptr @pool_cfg, i64 7
  store atomic i64 %on, ptr %serp seq_cst, align 8
  ret void
}

define i64 @narch_pool_alive() {
  %alivep = getelementptr i64, ptr @pool_cfg, i64 3
  %a = load atomic i64, ptr %alivep acquire, align 8
  ret i64 %a
}

; In a forked child only the forking thread exists: forget the parent's workers.
define void @narch_pool_after_fork() {
  store atomic i64 0, ptr @pool_cfg seq_cst, align 8
  %serp = getelementptr i64, ptr @pool_cfg, i64 7
  store atomic i64 0, ptr %serp seq_cst, align 8
  %alivep = getelementptr i64, ptr @pool_cfg, i64 3
  store atomic i64 0, ptr %alivep seq_cst, align 8
  store atomic i64 0, ptr @job_entry seq_cst, align 8
  store atomic i32 0, ptr @pool_sleepers seq_cst, align 4
  store atomic i32 0, ptr @pool_busy seq_cst, align 4
  ret void
}
"""


# Elsewhere than Linux (no futex, no pthread_*_np) the same interface runs serially.
_SERIAL_IR = r"""
define void @narch_parallel_for(ptr %fn, ptr %ctx, i64 %n) {
entry:
  %any = icmp sgt i64 %n, 0
  br i1 %any, label %loop, label %done
loop:
  %i = phi i64 [ 0, %entry ], [ %next, %loop ]
  call void %fn(ptr %ctx, i64 %i)
  %next = add nuw nsw i64 %i, 1
  %more = icmp slt i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}
define i64 @narch_pool_start(i64 %nworkers, ptr %cpus, i64 %spin_ns) {
  ret i64 0
}
define void @narch_pool_stop() {
  ret void
}
define i64 @narch_pool_alive() {
  ret i64 0
}
define i64 @narch_num_threads() {
  ret i64 1
}
define void @narch_pool_set_serial(i64 %on) {
  ret void
}
define void @narch_pool_state(ptr %out) {
  call void @llvm.memset.p0.i64(ptr %out, i8 0, i64 96, i1 false)
  ret void
}
define void @narch_pool_set_caller_steering(ptr %w, ptr %c, i64 %on) {
  ret void
}
define void @narch_pool_after_fork() {
  ret void
}
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
"""


# x86: a job carries its caller's MXCSR (rounding mode, flush-to-zero / denormals-are-zero),
# and a worker runs the job's tasks under it, so a program that flushes subnormals
# (``Program(..., options={"flush_denormals": True})``) does so on every thread.  The
# store and the load happen once per job (stmxcsr / ldmxcsr: a few cycles each).
_ENV_DECL = """declare void @llvm.x86.sse.stmxcsr(ptr)
declare void @llvm.x86.sse.ldmxcsr(ptr)"""
_ENV_PUBLISH = """call void @llvm.x86.sse.stmxcsr(ptr %envp)"""
_ENV_ADOPT = """call void @llvm.x86.sse.ldmxcsr(ptr %envp)"""


def _pool_ir() -> str:
    if not sys.platform.startswith("linux"):
        return _SERIAL_IR
    x86 = jit.is_x86()
    return (_POOL_IR
            .replace("__PAUSE_DECL__", "declare void @llvm.x86.sse2.pause()" if x86 else "")
            .replace("__PAUSE_CALL__", "call void @llvm.x86.sse2.pause()" if x86 else "")
            .replace("__ENV_DECL__", _ENV_DECL if x86 else "")
            .replace("__ENV_PUBLISH__", _ENV_PUBLISH if x86 else "")
            .replace("__ENV_ADOPT__", _ENV_ADOPT if x86 else "")
            .replace("__NOT_OPEN__", str(~_OPEN))
            .replace("__OPEN__", str(_OPEN)))


@functools.lru_cache(maxsize=None)
def _pool_sources() -> str:
    """A hash of the sources that turn the pool's IR into object code (this file, jit.py)."""
    h = hashlib.sha256()
    for path in (__file__, jit.__file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _pool_object() -> bytes:
    """The pool's object code: from the disk cache, else optimised and compiled (and stored).
    Compiling it takes 100-170 ms, and every process needs it before any program's code
    loads: on a cached compile it was the longest wait (the small GPT-2 step's compile
    waited 40-60 ms for it after tracing, passes and records, which it overlaps)."""
    from .cache import disk_cache
    text = _pool_ir()
    cache = disk_cache()
    parts = {"kind": "thread pool", "ir": text, "toolchain": jit.toolchain_id(), "sources": _pool_sources()}
    obj = cache.get(parts) if cache is not None else None
    if obj is None:
        obj = jit.emit_object(jit.optimize(text, "narch_pool"))
        if cache is not None:
            cache.put(parts, obj)
    return obj


_lock = threading.RLock()
_loaded = None  # the pool's engine; deliberately leaked (see module docstring)
_address = 0
_fns: dict = {}
_threads = 1    # threads used by narch_parallel_for, caller included
_parallel_for = None
_hooks_registered = False
_serial_on = False    # set_serial
_serial_holds = 0     # serial_hold / serial_release
_serial_lock = threading.Lock()


def _configured_threads() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = os.environ.get("NEURAL_ARCH_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"NEURAL_ARCH_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"NEURAL_ARCH_NUM_THREADS must be a positive integer, got {env!r}")
        return min(n, MAX_WORKERS + 1)
    return max(1, cpus)


def _spin_ns() -> int:
    return int(float(os.environ.get("NEURAL_ARCH_SPIN_US", "200")) * 1000)


def _start(threads: int) -> int:
    """Start threads-1 pinned workers; returns the thread count in effect."""
    global _threads
    if threads <= 1 or not sys.platform.startswith("linux"):
        _threads = 1
        return 1
    allowed = sorted(os.sched_getaffinity(0))
    placement = [allowed[k % len(allowed)] for k in range(threads)]
    worker_cpus = set(placement[1:])
    caller_cpus = [c for c in allowed if c not in worker_cpus]
    wset, cset = (ctypes.c_uint64 * 16)(), (ctypes.c_uint64 * 16)()
    for c in worker_cpus:
        if c < 1024:
            wset[c // 64] |= 1 << (c % 64)
    for c in caller_cpus:
        if c < 1024:
            cset[c // 64] |= 1 << (c % 64)
    steer = bool(caller_cpus) and os.environ.get("NEURAL_ARCH_STEER_CALLER", "1") != "0"
    _fns["steer"](wset, cset, int(steer))
    cpus = (ctypes.c_int32 * threads)(*placement)
    started = _fns["start"](threads - 1, cpus, _spin_ns())
    _threads = 1 + started
    deadline = time.monotonic() + 0.5  # let the workers come up (not needed for correctness)
    buf = (ctypes.c_int64 * 12)()
    while time.monotonic() < deadline:
        _fns["state"](buf)
        if buf[6] >= started:
            break
        time.sleep(0.0002)
    return _threads


def _stop(timeout: float = 1.0) -> bool:
    """Stop the workers; True when all have exited within ``timeout`` seconds."""
    global _threads
    if _loaded is None:
        return True
    _fns["stop"]()
    _threads = 1
    deadline = time.monotonic() + timeout
    while _fns["alive"]() > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def _after_fork_in_child() -> None:
    global _lock, _serial_on, _serial_holds, _serial_lock
    _lock = threading.RLock()
    _serial_on, _serial_holds, _serial_lock = False, 0, threading.Lock()
    if _loaded is not None:
        _fns["after_fork"]()
        _start(_configured_threads())


_background_failure: BaseException | None = None


def install_keeping_error() -> None:
    """``install()`` for a helper thread: an error is kept for the next ``install()``, which
    raises it in the thread that needs the pool (later calls try again)."""
    global _background_failure
    try:
        install()
    except Exception as e:  # noqa: BLE001 - raised by the next install(), see above
        with _lock:
            _background_failure = e


def install() -> None:
    """Compile and start the pool; make ``narch_parallel_for`` resolvable by later MCJIT loads.

    Idempotent and thread-safe.  Call it before loading any module that uses the symbol.
    """
    global _loaded, _address, _parallel_for, _hooks_registered, _background_failure
    if _loaded is not None:
        return
    with _lock:
        if _loaded is not None:
            return
        failed, _background_failure = _background_failure, None
        if failed is not None:  # (``install_keeping_error``: the caller who needs the pool gets its error)
            raise failed
        threads = _configured_threads()  # a bad NEURAL_ARCH_NUM_THREADS fails before anything
        loaded = jit.load(None, _pool_object())
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(loaded))  # never free the workers' code
        _fns["start"] = loaded.function("narch_pool_start", ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_int64)
        _fns["stop"] = loaded.function("narch_pool_stop", None)
        _fns["alive"] = loaded.function("narch_pool_alive", ctypes.c_int64)
        _fns["state"] = loaded.function("narch_pool_state", None, ctypes.c_void_p)
        _fns["steer"] = loaded.function("narch_pool_set_caller_steering", None, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int64)
        _fns["after_fork"] = loaded.function("narch_pool_after_fork", None)
        _fns["serial"] = loaded.function("narch_pool_set_serial", None, ctypes.c_int64)
        addr = loaded.address(SYMBOL)
        _parallel_for = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(addr)
        llvm.add_symbol(SYMBOL, addr)
        llvm.add_symbol(THREADS_SYMBOL, loaded.address(THREADS_SYMBOL))
        _address = addr
        _start(threads)
        _loaded = loaded  # last: the unlocked fast path above sees a running pool
        if not _hooks_registered:
            atexit.register(_stop, 0.2)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_after_fork_in_child)
            _hooks_registered = True


def state() -> dict:
    """A snapshot of the pool's shared words (for debugging)."""
    install()
    buf = (ctypes.c_int64 * 12)()
    _fns["state"](buf)
    names = ["nworkers", "spin_ns", "stop", "alive", "start_gen", "steer", "ready",
             "gen", "sleepers", "busy", "entry", "next"]
    return dict(zip(names, buf))


def address() -> int:
    """Address of ``narch_parallel_for`` (installs the pool)."""
    install()
    return _address


def num_threads() -> int:
    """Threads ``narch_parallel_for`` uses, the caller included (installs the pool)."""
    install()
    return _threads


def set_serial(on: bool) -> None:
    """While ``on``, ``narch_parallel_for`` runs every call's tasks on the calling thread and
    ``narch_num_threads()`` answers 1 (the workers stay up and go to sleep): a cheap switch
    (one store).  Process-wide: a program running in another Python thread meanwhile runs
    serially too.  Independent of ``serial_hold`` (serial while either asks for it)."""
    global _serial_on
    install()
    with _serial_lock:
        _serial_on = bool(on)
        _fns["serial"](1 if (_serial_on or _serial_holds) else 0)


def serial_hold() -> None:
    """Serial until the matching ``serial_release``; holds nest and add up across threads
    (a training step's ``ThreadChoice`` holds it for a call it runs on one thread)."""
    global _serial_holds
    if "serial" not in _fns:
        install()
    with _serial_lock:
        _serial_holds += 1
        if _serial_holds == 1 and not _serial_on:
            _fns["serial"](1)


def serial_release() -> None:
    global _serial_holds
    with _serial_lock:
        if _serial_holds <= 0:
            raise RuntimeError("serial_release without serial_hold")
        _serial_holds -= 1
        if _serial_holds == 0 and not _serial_on:
            _fns["serial"](0)


def serial() -> bool:
    """Whether calls run serially now (``set_serial(True)`` or a ``serial_hold``)."""
    return _serial_on or _serial_holds > 0


def set_num_threads(n: int) -> int:
    """Restart the pool with ``n`` threads (caller included); returns the count in effect.

    For benchmarks and tests; must not race with running parallel_for calls.
    """
    if n < 1:
        raise ValueError("need at least one thread")
    install()
    with _lock:
        if not _stop(timeout=2.0):
            raise RuntimeError("thread pool workers did not stop")
        return _start(min(n, MAX_WORKERS + 1))


def parallel_for(fn_address: int, ctx: int, n_tasks: int) -> None:
    """Call ``narch_parallel_for`` from Python (``fn_address``: a native ``void(ptr, i64)``)."""
    install()
    _parallel_for(fn_address, ctx, n_tasks)


# ------------------------------------------------------------------ measurement helpers
_BENCH_IR = r"""
declare void @narch_parallel_for(ptr, ptr, i64)
declare i32 @clock_gettime(i32, ptr)
__PAUSE_DECL__

define internal i64 @now() {
  %ts = alloca { i64, i64 }, align 8
  %r = call i32 @clock_gettime(i32 1, ptr %ts)
  %sec = load i64, ptr %ts
  %nsp = getelementptr { i64, i64 }, ptr %ts, i64 0, i32 1
  %ns = load i64, ptr %nsp
  %s1 = mul i64 %sec, 1000000000
  %t = add i64 %s1, %ns
  ret i64 %t
}

define void @empty_task(ptr %ctx, i64 %t) {
  ret void
}

; every task waits until all n tasks have started: forces every thread to take part
; ctx: [0] = started counter, [1] = n
define void @barrier_task(ptr %ctx, i64 %t) {
entry:
  %s = atomicrmw add ptr %ctx, i64 1 seq_cst
  %np = getelementptr i64, ptr %ctx, i64 1
  %n = load i64, ptr %np
  br label %wait
wait:
  %c = load atomic i64, ptr %ctx acquire, align 8
  %done = icmp sge i64 %c, %n
  br i1 %done, label %out, label %spin
spin:
  __PAUSE_CALL__
  br label %wait
out:
  ret void
}

; mean ns per parallel_for call over reps calls (barrier: every thread must join each call)
define i64 @bench(i64 %reps, i64 %n, i1 %barrier) {
entry:
  %ctx = alloca [2 x i64], align 8
  %np = getelementptr i64, ptr %ctx, i64 1
  store i64 %n, ptr %np
  %fn = select i1 %barrier, ptr @barrier_task, ptr @empty_task
  %t0 = call i64 @now()
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]
  store atomic i64 0, ptr %ctx release, align 8
  call void @narch_parallel_for(ptr %fn, ptr %ctx, i64 %n)
  %i1 = add i64 %i, 1
  %more = icmp slt i64 %i1, %reps
  br i1 %more, label %loop, label %out
out:
  %t1 = call i64 @now()
  %dt = sub i64 %t1, %t0
  %per = sdiv i64 %dt, %reps
  ret i64 %per
}
"""
_bench = None


def _bench_fn():
    global _bench
    install()
    if _bench is None:
        x86 = jit.is_x86()
        src = (_BENCH_IR
               .replace("__PAUSE_DECL__", "declare void @llvm.x86.sse2.pause()" if x86 else "")
               .replace("__PAUSE_CALL__", "call void @llvm.x86.sse2.pause()" if x86 else ""))
        loaded = jit.load(jit.optimize(src, "narch_pool_bench"))
        fn = loaded.function("bench", ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_bool)
        _bench = (loaded, fn)
    return _bench[1]


def round_trip_ns(reps: int = 20000, n_tasks: int | None = None, barrier: bool = False) -> float:
    """ns of one ``narch_parallel_for`` call of empty tasks, timed natively, workers hot.

    The median over batches of 100 back-to-back calls (robust to a neighbour process
    stealing a core for a while).  ``barrier=True`` makes every task wait until all tasks
    started, so every thread must answer each call (the pure hand-off latency); otherwise
    the caller may run all tasks itself before a worker arrives.
    """
    fn = _bench_fn()
    n = num_threads() if n_tasks is None else n_tasks
    fn(1000, n, barrier)  # warm up: wakes and spins the workers
    batches = sorted(fn(100, n, barrier) for _ in range(max(1, reps // 100)))
    return float(batches[len(batches) // 2])


def wake_latency_ns(samples: int = 20, idle_s: float | None = None) -> list[float]:
    """ns of a barrier call (all threads must join) after the workers went to sleep."""
    fn = _bench_fn()
    n = num_threads()
    idle = idle_s if idle_s is not None else max(0.002, 3 * _spin_ns() * 1e-9)
    out = []
    for _ in range(samples):
        time.sleep(idle)
        out.append(float(fn(1, n, True)))
    return out
