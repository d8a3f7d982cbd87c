/*
 * dispatch.c — CPU feature detection, tier selection and the public entry points.
 *
 * Built with no ISA flags: everything here must run on any x86-64 (or other) CPU, because it
 * is what decides whether the AVX2 / AVX-512 files may be entered at all.  Features are read
 * once with cpuid, and the OS support for the wide register state with xgetbv (a CPU with
 * AVX-512 under an OS/hypervisor that does not save ZMM state must not use it).
 *
 * The public ops prepare a bitlm_problem (pad activations to the format's block, row sums,
 * epilogue factors) and split the output row tiles over the thread pool.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#if defined(__linux__) && defined(__x86_64__)
#include <errno.h>
#include <sys/syscall.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define BITLM_X86 1
#endif

/* ---- feature detection ----------------------------------------------------------------------- */

static int g_supported[BITLM_NUM_TIERS];
static char g_flags[256];
static char g_note[256];
static const bitlm_kernel_table *g_tables[BITLM_NUM_TIERS];
static _Atomic(const bitlm_kernel_table *) g_active;
static int g_tier = -1;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t g_tier_mu = PTHREAD_MUTEX_INITIALIZER;

#ifdef BITLM_X86
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

static void append_flag(const char *f) {
    const size_t len = strlen(g_flags);
    snprintf(g_flags + len, sizeof g_flags - len, "%s%s", len ? " " : "", f);
}

/* ---- CPU identity, caches, blocking choices ------------------------------------------------- */

static char g_vendor[13];
static unsigned g_family, g_model, g_stepping;
static bitlm_kernel_cfg g_cfg;
static char g_config[512];

static void detect_identity(void) {
#ifdef BITLM_X86
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
        memcpy(g_vendor, &b, 4);
        memcpy(g_vendor + 4, &d, 4);
        memcpy(g_vendor + 8, &c, 4);
        g_vendor[12] = 0;
    }
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        const unsigned base_fam = (a >> 8) & 0xf, ext_fam = (a >> 20) & 0xff;
        const unsigned base_model = (a >> 4) & 0xf, ext_model = (a >> 16) & 0xf;
        g_family = base_fam == 0xf ? base_fam + ext_fam : base_fam;
        g_model = (base_fam == 0x6 || base_fam == 0xf) ? (ext_model << 4) | base_model : base_model;
        g_stepping = a & 0xf;
    }
#endif
}

/* A positive byte count from the environment (suffix K or M allowed), else dflt. */
static int64_t env_bytes(const char *name, int64_t dflt) {
    const char *e = getenv(name);
    if (!e || !*e) return dflt;
    char *end = NULL;
    long long v = strtoll(e, &end, 10);
    if (end && (*end == 'k' || *end == 'K')) v <<= 10;
    if (end && (*end == 'm' || *end == 'M')) v <<= 20;
    return v >= 0 ? (int64_t)v : dflt;
}

/* The GEMM's activation block: a quarter of the per-core L2 (the weights of the tile pairs
 * stream through the rest), at least 128 KB, at most 1 MB.  The 256 KB this replaces was
 * tuned on a 1 MB-L2 Zen 5; Intel server cores have 2 MB. */
static void detect_caches(void) {
    long l1 = -1, l2 = -1, l3 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    g_cfg.l1d_bytes = l1 > 0 ? l1 : 0;
    g_cfg.l2_bytes = l2 > 0 ? l2 : 0;
    g_cfg.l3_bytes = l3 > 0 ? l3 : 0;
    int64_t xb = g_cfg.l2_bytes ? g_cfg.l2_bytes / 4 : 256 * 1024;
    xb = xb < 128 * 1024 ? 128 * 1024 : xb > 1024 * 1024 ? 1024 * 1024 : xb;
    g_cfg.x_block_bytes = env_bytes("BITLM_GEMM_XBLOCK", xb);
    if (g_cfg.x_block_bytes < 4096) g_cfg.x_block_bytes = 4096;
    int64_t sm = env_bytes("BITLM_GEMM_SMALL_M", 8);
    g_cfg.small_m_max = sm > 8 ? 8 : sm;
    /* The GEMV plan per format: tiles read at once per thread, software prefetch distance (bytes
     * ahead in each stream) and level.  One sequential stream 8 KB ahead into L1 was fastest on
     * Zen 5 (see x86_avx512.c).  On the Intel Xeon of 2026-12-03 (family 6 model 167, cold GEMV
     * over a 2B4T's matrices, docs/performance.md): i2 four tiles at once 2 KB ahead (25.7 vs
     * 22.0 GB/s with two tiles 8 KB ahead, the read probe 27-28); t1, which is bound by its ten
     * vpdpbusd per chunk, one tile 8 KB ahead into L2 (21.6 vs 17.1).  Chosen by vendor until
     * more parts are measured; BITLM_GEMV_STREAMS (1, 2, 4; t1 and b1 at most 2),
     * BITLM_GEMV_PREFETCH (bytes) and BITLM_GEMV_PREFETCH_L2 (0 / 1) override every format. */
    const int intel = strcmp(g_vendor, "GenuineIntel") == 0;
    for (int f = BITLM_FMT_I2; f <= BITLM_FMT_B1; f++) {
        int64_t st = 1, pf = 8192, l2 = 0;
        if (intel && f == BITLM_FMT_I2) st = 4, pf = 2048;
        if (intel && f == BITLM_FMT_T1) l2 = 1;
        if (intel && f == BITLM_FMT_B1) st = 2;
        st = env_bytes("BITLM_GEMV_STREAMS", st);
        st = st >= 4 ? (f == BITLM_FMT_I2 ? 4 : 2) : st >= 2 ? 2 : 1;
        pf = env_bytes("BITLM_GEMV_PREFETCH", pf);
        g_cfg.gemv_streams[f] = st;
        g_cfg.gemv_prefetch[f] = pf < 64 ? 64 : pf > (1 << 20) ? (1 << 20) : pf;
        g_cfg.gemv_pf_l2[f] = env_bytes("BITLM_GEMV_PREFETCH_L2", l2) == 1;
    }
    /* i2 GEMV unpack: masks in place (x86_avx512.c gemv_i2, 7-8 % faster on the Xeon of
     * 2026-12-03); BITLM_GEMV_I2_SHIFT=1 keeps the shifting loop (A/B measurements, tests) */
    g_cfg.gemv_i2_mask = env_bytes("BITLM_GEMV_I2_SHIFT", 0) == 1 ? 0 : 1;
    /* Large-M GEMM (avx512): unpack each tile once per activation block into per-thread scratch
     * (x86_avx512.c unpack_codes, gemm_tiles) instead of once per 6-token block: t1 and b1, whose unpack
     * costs more than one AND (Zen 4, M = 512, GMAC/s per core: t1 150-161 -> 199-209, b1
     * 166-190 -> 202; i2 204-217 -> 191-208, so i2 keeps the register unpack).
     * BITLM_GEMM_CODES = 0 / 1 overrides every format. */
    for (int f = BITLM_FMT_I2; f <= BITLM_FMT_B1; f++)
        g_cfg.gemm_codes[f] = env_bytes("BITLM_GEMM_CODES", f != BITLM_FMT_I2) == 1;
    /* W8A8 head, decode (x86_avx512.c): one row at a time as one sequential stream on AMD, 4 KB
     * ahead into L2 (Zen 4: 13.3 -> 21.9 GB/s at 1 thread with 8 KB into L1, then decode i2
     * +10-16 % at 1 and 2 threads with 4 KB into L2), the four-row blocks elsewhere (tuned on the
     * Intel Xeon).  BITLM_HEAD_ROWS (1 / 4), BITLM_HEAD_PREFETCH (bytes) and
     * BITLM_HEAD_PREFETCH_L2 (0 / 1) override. */
    g_cfg.head_rows = env_bytes("BITLM_HEAD_ROWS", intel ? 4 : 1) == 1 ? 1 : 4;
    const int64_t hp = env_bytes("BITLM_HEAD_PREFETCH", 4096);
    g_cfg.head_prefetch = hp < 64 ? 64 : hp > (1 << 20) ? (1 << 20) : hp;
    g_cfg.head_pf_l2 = env_bytes("BITLM_HEAD_PREFETCH_L2", 1) == 1;
}

static void init_once(void);

/* ---- AMX ------------------------------------------------------------------------------------ */

static int g_amx_cpu; /* cpuid AMX-TILE + AMX-INT8 and XCR0 enables the tile state */
#ifdef BITLM_HAVE_AMX
static int g_amx; /* the AMX GEMM is used (with the avx512 tier, for M >= AMX_MIN_M) */
#endif
static char g_amx_note[96] = "off (not initialised)";
/* The smallest M the AMX GEMM takes.  Measured on the Xeon of 2026-12-03 (docs/performance.md):
 * faster than the VNNI kernels from M = 2 on. */
#define AMX_MIN_M 2
/* The smallest M the AMX W8A8 head (bitlm_dense_i8a8) takes; measured likewise. */
#define AMX_I8A8_MIN_M 2

/* Once per process: may this process use the AMX tiles?  Linux hands the 8 KB tile state to a
 * process only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first
 * tile instruction faults.  The permission covers every thread of the process. */
static void amx_init(void) {
    const char *env = getenv("BITLM_AMX");
#ifndef BITLM_HAVE_AMX
    (void)env;
    snprintf(g_amx_note, sizeof g_amx_note, "off (not built: the compiler lacks -mamx-tile/-mamx-int8)");
#else
    if (env && (!strcmp(env, "0") || !strcmp(env, "off") || !strcmp(env, "no") || !strcmp(env, "false"))) {
        snprintf(g_amx_note, sizeof g_amx_note, "off (BITLM_AMX=%.8s)", env);
        return;
    }
    if (!g_amx_cpu) {
        snprintf(g_amx_note, sizeof g_amx_note, "off (cpu/os: no amx_tile+amx_int8)");
        return;
    }
#if defined(__linux__) && defined(__x86_64__)
    /* ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
        snprintf(g_amx_note, sizeof g_amx_note, "off (arch_prctl XTILEDATA refused: %s)", strerror(errno));
        return;
    }
    g_amx = 1;
    snprintf(g_amx_note, sizeof g_amx_note, "on");
#else
    snprintf(g_amx_note, sizeof g_amx_note, "off (tile state request only implemented for Linux)");
#endif
#endif
}

const bitlm_kernel_cfg *bitlm_cfg(void) {
    pthread_once(&g_once, init_once);
    return &g_cfg;
}

static void detect(void) {
    detect_identity();
    detect_caches();
    g_supported[BITLM_TIER_GENERIC] = 1;
    g_tables[BITLM_TIER_GENERIC] = &bitlm_generic_table;
#ifdef BITLM_X86
    unsigned a, b, c, d;
    int avx = 0, fma = 0, osxsave = 0, avx2 = 0, bmi2 = 0;
    int f512 = 0, bw = 0, vl = 0, dq = 0, vnni = 0, vbmi = 0, ymm_os = 0, zmm_os = 0, tile_os = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        fma = (c >> 12) & 1;
        osxsave = (c >> 27) & 1;
        avx = (c >> 28) & 1;
    }
    if (osxsave) {
        const uint64_t xcr0 = xgetbv0();
        ymm_os = (xcr0 & 0x6) == 0x6;   /* SSE + AVX state */
        zmm_os = (xcr0 & 0xe6) == 0xe6; /* + opmask, ZMM_Hi256, Hi16_ZMM */
        tile_os = (xcr0 & 0x60000) == 0x60000; /* XTILECFG, XTILEDATA */
    }
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        avx2 = (b >> 5) & 1;
        bmi2 = (b >> 8) & 1;
        f512 = (b >> 16) & 1;
        dq = (b >> 17) & 1;
        bw = (b >> 30) & 1;
        vl = (b >> 31) & 1;
        vbmi = (c >> 1) & 1;
        vnni = (c >> 11) & 1;
        g_amx_cpu = ((d >> 24) & 1) && ((d >> 25) & 1); /* AMX-TILE, AMX-INT8 */
    }
    g_amx_cpu = g_amx_cpu && tile_os;
    if (avx && ymm_os) append_flag("avx");
    if (fma) append_flag("fma");
    if (avx2) append_flag("avx2");
    if (bmi2) append_flag("bmi2");
    if (f512) append_flag("avx512f");
    if (dq) append_flag("avx512dq");
    if (bw) append_flag("avx512bw");
    if (vl) append_flag("avx512vl");
    if (vbmi) append_flag("avx512vbmi");
    if (vnni) append_flag("avx512vnni");
    if (!zmm_os && f512) append_flag("(os-no-zmm)");
    if (g_amx_cpu) append_flag("amx_tile amx_int8");
#ifdef BITLM_HAVE_AVX2
    g_tables[BITLM_TIER_AVX2] = &bitlm_avx2_table;
    g_supported[BITLM_TIER_AVX2] = avx && avx2 && fma && ymm_os;
#endif
#ifdef BITLM_HAVE_AVX512
    g_tables[BITLM_TIER_AVX512] = &bitlm_avx512_table;
    g_supported[BITLM_TIER_AVX512] = g_supported[BITLM_TIER_AVX2] && f512 && bw && vl && vnni && zmm_os;
#endif
#endif /* BITLM_X86 */
    if (!g_flags[0]) append_flag("(none)");
}

static int best_tier(void) {
    for (int t = BITLM_NUM_TIERS - 1; t > 0; t--)
        if (g_supported[t]) return t;
    return BITLM_TIER_GENERIC;
}

static int parse_tier(const char *s) {
    if (!strcmp(s, "generic") || !strcmp(s, "scalar")) return BITLM_TIER_GENERIC;
    if (!strcmp(s, "avx2")) return BITLM_TIER_AVX2;
    if (!strcmp(s, "avx512") || !strcmp(s, "avx512vnni")) return BITLM_TIER_AVX512;
    return -1;
}

static void init_once(void) {
    detect();
    int tier = best_tier();
    snprintf(g_note, sizeof g_note, "best supported tier (cpuid)");
    const char *env = getenv("BITLM_KERNEL_TIER");
    if (env && *env && strcmp(env, "auto") != 0) {
        const int want = parse_tier(env);
        if (want < 0) {
            snprintf(g_note, sizeof g_note, "BITLM_KERNEL_TIER=%.40s not understood; using %s", env,
                     bitlm_tier_name(tier));
        } else {
            int t = want;
            while (t > 0 && !g_supported[t]) t--; /* never run what the CPU cannot execute */
            if (t == want)
                snprintf(g_note, sizeof g_note, "forced by BITLM_KERNEL_TIER=%s", env);
            else
                snprintf(g_note, sizeof g_note, "BITLM_KERNEL_TIER=%.40s unsupported here; fell back to %s", env,
                         bitlm_tier_name(t));
            tier = t;
        }
    }
    g_tier = tier;
    atomic_store(&g_active, g_tables[tier]);
    amx_init();
}

static const char *fmt_name(int f) { return f == BITLM_FMT_I2 ? "i2" : f == BITLM_FMT_T1 ? "t1" : "b1"; }

BITLM_API const char *bitlm_kernel_config(void) {
    pthread_once(&g_once, init_once);
    pthread_mutex_lock(&g_tier_mu);
    char gemv[128]; /* e.g. i2:4x2048/l1,t1:1x8192/l2,b1:2x8192/l1 */
    int off = 0;
    for (int f = BITLM_FMT_I2; f <= BITLM_FMT_B1; f++)
        off += snprintf(gemv + off, sizeof gemv - (size_t)off, "%s%s:%lldx%lld/%s", f > BITLM_FMT_I2 ? "," : "",
                        fmt_name(f), (long long)g_cfg.gemv_streams[f],
                        (long long)g_cfg.gemv_prefetch[f], g_cfg.gemv_pf_l2[f] ? "l2" : "l1");
    char head[40]; /* the W8A8 head's decode plan: rows1/4096/l2 or rows4 */
    if (g_cfg.head_rows == 1)
        snprintf(head, sizeof head, "rows1/%lld/%s", (long long)g_cfg.head_prefetch, g_cfg.head_pf_l2 ? "l2" : "l1");
    else
        snprintf(head, sizeof head, "rows4");
    char codes[16] = ""; /* formats whose large-M GEMM reads unpacked codes, e.g. t1 or i2+t1 */
    for (int f = BITLM_FMT_I2; f <= BITLM_FMT_B1; f++)
        if (g_cfg.gemm_codes[f])
            snprintf(codes + strlen(codes), sizeof codes - strlen(codes), "%s%s", codes[0] ? "+" : "",
                     fmt_name(f));
    snprintf(g_config, sizeof g_config,
             "vendor=%s family=%u model=%u stepping=%u l1d=%lldK l2=%lldK l3=%lldK tier=%s gemm_block=2x6 "
             "gemm_x_block=%lldK gemm_codes=%s small_m_max=%lld gemv=%s gemv_i2=%s head=%s attn_split=%lld amx=%s",
             g_vendor[0] ? g_vendor : "?", g_family, g_model, g_stepping, (long long)(g_cfg.l1d_bytes >> 10),
             (long long)(g_cfg.l2_bytes >> 10), (long long)(g_cfg.l3_bytes >> 10), bitlm_tier_name(g_tier),
             (long long)(g_cfg.x_block_bytes >> 10), codes[0] ? codes : "none", (long long)g_cfg.small_m_max, gemv,
             g_cfg.gemv_i2_mask ? "mask" : "shift", head, (long long)bitlm_attn_split(), g_amx_note);
    pthread_mutex_unlock(&g_tier_mu);
    return g_config;
}

static const bitlm_kernel_table *active(void) {
    pthread_once(&g_once, init_once);
    return atomic_load(&g_active);
}

const bitlm_kernel_table *bitlm_active_table(void) { return active(); }

/* ---- library / dispatch API ------------------------------------------------------------------ */

BITLM_API int bitlm_abi_version(void) { return BITLM_ABI_VERSION; }

BITLM_API int bitlm_tier(void) {
    pthread_once(&g_once, init_once);
    pthread_mutex_lock(&g_tier_mu);
    const int t = g_tier;
    pthread_mutex_unlock(&g_tier_mu);
    return t;
}

BITLM_API int bitlm_best_tier(void) {
    pthread_once(&g_once, init_once);
    return best_tier();
}

BITLM_API int bitlm_tier_supported(int tier) {
    pthread_once(&g_once, init_once);
    return tier >= 0 && tier < BITLM_NUM_TIERS && g_supported[tier];
}

BITLM_API int bitlm_set_tier(int tier) {
    pthread_once(&g_once, init_once);
    if (tier < 0 || tier >= BITLM_NUM_TIERS || !g_supported[tier]) return BITLM_ENOTIER;
    pthread_mutex_lock(&g_tier_mu);
    g_tier = tier;
    snprintf(g_note, sizeof g_note, "set by bitlm_set_tier(%s)", bitlm_tier_name(tier));
    atomic_store(&g_active, g_tables[tier]);
    pthread_mutex_unlock(&g_tier_mu);
    return 0;
}

BITLM_API const char *bitlm_tier_name(int tier) {
    switch (tier) {
    case BITLM_TIER_GENERIC: return "generic";
    case BITLM_TIER_AVX2: return "avx2";
    case BITLM_TIER_AVX512: return "avx512";
    default: return "?";
    }
}

BITLM_API const char *bitlm_tier_note(void) {
    pthread_once(&g_once, init_once);
    return g_note;
}

BITLM_API const char *bitlm_cpu_flags(void) {
    pthread_once(&g_once, init_once);
    return g_flags;
}

BITLM_API const char *bitlm_build_info(void) {
    return "compiler " __VERSION__ "; tiers generic"
#ifdef BITLM_HAVE_AVX2
           " avx2"
#endif
#ifdef BITLM_HAVE_AVX512
           " avx512"
#endif
#ifdef BITLM_HAVE_AMX
           " (+amx gemm)"
#endif
        ;
}

/* ---- geometry -------------------------------------------------------------------------------- */

BITLM_API int bitlm_format_block_k(int fmt) {
    const int bk = bitlm_block_k(fmt);
    return bk ? bk : BITLM_EINVAL;
}

BITLM_API int64_t bitlm_packed_bytes(int fmt, int64_t n, int64_t k) {
    const int bk = bitlm_block_k(fmt);
    if (!bk || n < 0 || k < 0) return BITLM_EINVAL;
    const int64_t tiles = (n + BITLM_TILE_N - 1) / BITLM_TILE_N;
    const int64_t chunks = (k + bk - 1) / bk;
    return tiles * chunks * BITLM_CHUNK_BYTES;
}

/* ---- matmul ---------------------------------------------------------------------------------- */

typedef struct {
    const bitlm_problem *p;
    bitlm_mm_fn fn;
} mm_task;

static void mm_task_run(void *ctx, int64_t b, int64_t e) {
    const mm_task *t = (const mm_task *)ctx;
    t->fn(t->p, b, e);
}

static int run_matmul(int fmt, const int8_t *x, const float *a, int64_t m, int64_t k, const uint8_t *w,
                      const float *s, int64_t groups, int64_t n, const float *bias, int32_t *yi, float *yf) {
    const int bk = bitlm_block_k(fmt);
    if (!bk || !x || !w || m < 0 || k < 0 || n < 0 || (!yi && !yf)) return BITLM_EINVAL;
    if (yf && (!a || !s || groups < 1 || n % groups != 0)) return BITLM_EINVAL;
    if (m == 0 || n == 0) return 0;
    const bitlm_kernel_table *tab = active();

    bitlm_problem p;
    bitlm_problem_init(&p, fmt, m, k, w, n, groups, bias, yi, yf);
    bitlm_mm_fn fn = tab->mm[fmt];
    int64_t xstride = p.Kp; /* the kernels' activation row stride */
#ifdef BITLM_HAVE_AMX
    /* AMX: with the avx512 tier only (a forced lower tier must not run it), rows padded to 64 */
    if (g_amx && m >= AMX_MIN_M && tab == &bitlm_avx512_table) {
        fn = bitlm_amx_mm[fmt];
        xstride = bitlm_amx_kq(p.Kp);
    }
#endif

    /* one scratch block: row sums, epilogue factors, and (only when K is not a multiple of the
     * block, or of 64 for AMX) a zero-padded copy of the activations so that kernels never read
     * past a row. */
    const int need_pad = xstride != k;
    const size_t sum_bytes = (size_t)m * sizeof(int32_t);
    const size_t f_bytes = yf ? (size_t)m * (size_t)p.groups * sizeof(float) : 0;
    const size_t pad_bytes = need_pad ? (size_t)m * (size_t)xstride : 0;
    unsigned char *scratch = malloc(sum_bytes + f_bytes + pad_bytes + 64);
    if (!scratch) return BITLM_ENOMEM;
    int32_t *xsum = (int32_t *)(void *)scratch;
    float *f = (float *)(void *)(scratch + sum_bytes);
    int8_t *xpad = (int8_t *)(scratch + sum_bytes + f_bytes);
    for (int64_t i = 0; i < m; i++) {
        const int8_t *row = x + i * k;
        int32_t acc = 0;
        for (int64_t j = 0; j < k; j++) acc += row[j];
        xsum[i] = acc;
        if (need_pad) {
            memcpy(xpad + i * xstride, row, (size_t)k);
            memset(xpad + i * xstride + k, 0, (size_t)(xstride - k));
        }
        if (yf)
            for (int64_t g = 0; g < p.groups; g++) f[i * p.groups + g] = s[g] / a[i]; /* float32 */
    }
    p.x = need_pad ? xpad : x;
    p.xsum = xsum;
    p.f = f;

    const int64_t tiles = (n + BITLM_TILE_N - 1) / BITLM_TILE_N;
    const int max_threads = bitlm_threads_for((double)m * (double)n * (double)k);
    /* GEMM kernels take 2 tiles per pass: keep claims multiples of that */
    const int64_t grain = m == 1 ? bitlm_gemv_grain(p.tile_bytes) : 2;
    mm_task task = {&p, fn};
    bitlm_parallel_for(tiles, grain, max_threads, mm_task_run, &task);
    free(scratch);
    return 0;
}

BITLM_API int bitlm_gemm(int fmt, const int8_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int32_t *y) {
    if (!y) return BITLM_EINVAL;
    return run_matmul(fmt, x, NULL, m, k, w, NULL, 1, n, NULL, y, NULL);
}

BITLM_API int bitlm_matmul_f32(int fmt, const int8_t *x, const float *a, int64_t m, int64_t k, const uint8_t *w,
                               const float *s, int64_t groups, int64_t n, const float *bias, float *y) {
    if (!y) return BITLM_EINVAL;
    return run_matmul(fmt, x, a, m, k, w, s, groups, n, bias, NULL, y);
}

/* ---- quantiser ------------------------------------------------------------------------------- */

typedef struct {
    bitlm_quant_row_fn fn;
    const float *x, *w;
    int64_t k;
    double eps;
    int do_norm;
    int8_t *q;
    float *a;
} quant_task;

static void quant_task_run(void *ctx, int64_t b, int64_t e) {
    const quant_task *t = (const quant_task *)ctx;
    for (int64_t i = b; i < e; i++) t->fn(t->x + i * t->k, t->k, t->w, t->eps, t->do_norm, t->q + i * t->k, t->a + i);
}

BITLM_API int bitlm_quantize_rows(const float *x, int64_t m, int64_t k, const float *norm_w, double eps, int do_norm,
                                  int8_t *q, float *a) {
    if (!x || !q || !a || m < 0 || k < 1) return BITLM_EINVAL;
    if (m == 0) return 0;
    quant_task t = {active()->quant_row, x, norm_w, k, eps, do_norm, q, a};
    /* ~1 ns per element: only big prefill batches are worth splitting */
    const int max_threads = (int)((m * k) / (1 << 16)) + 1;
    bitlm_parallel_for(m, 1, max_threads, quant_task_run, &t);
    return 0;
}

/* ---- dense int8 / bf16 heads --------------------------------------------------------------- */

typedef struct {
    const bitlm_dense_problem *p;
    bitlm_dense_fn fn;
} dense_task;

static void dense_task_run(void *ctx, int64_t b, int64_t e) {
    const dense_task *t = (const dense_task *)ctx;
    t->fn(t->p, b, e);
}

/* Whole 64-row panels, threads by the MAC count. */
static int run_dense(const bitlm_dense_problem *p, bitlm_dense_fn fn) {
    if (p->M == 0 || p->N == 0) return 0;
    dense_task t = {p, fn};
    bitlm_parallel_for(p->N, 64, bitlm_threads_for((double)p->M * (double)p->N * (double)p->K), dense_task_run, &t);
    return 0;
}

BITLM_API int bitlm_dense_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                             float *y) {
    if (!x || !w || !scale || !y || m < 0 || k < 0 || n < 0) return BITLM_EINVAL;
    const bitlm_dense_problem p = {.x = x, .w = w, .scale = scale, .y = y, .M = m, .N = n, .K = k};
    return run_dense(&p, active()->dense_i8);
}

BITLM_API int bitlm_dense_i8a8(const int8_t *xq, const float *a, int64_t m, int64_t k, const int8_t *w,
                               const float *scale, int64_t n, float *y) {
    if (!xq || !a || !w || !scale || !y || m < 0 || k < 0 || k >= 131072 || n < 0) return BITLM_EINVAL;
    if (m == 0 || n == 0) return 0;
#ifdef BITLM_HAVE_AMX
    /* AMX tiles (x86_amx.c): with the avx512 tier only, from AMX_I8A8_MIN_M tokens on */
    if (g_amx && m >= AMX_I8A8_MIN_M && active() == &bitlm_avx512_table) {
        const bitlm_dense_problem pa = {.xq = xq, .a = a, .w = w, .scale = scale, .y = y, .M = m, .N = n, .K = k};
        if (bitlm_amx_i8a8(&pa) == 0) return 0;
    }
#endif
    int32_t *xsum = malloc((size_t)m * sizeof(int32_t));
    if (!xsum) return BITLM_ENOMEM;
    for (int64_t i = 0; i < m; i++) {
        int32_t s = 0; /* |s| <= 128 K < 2^24 */
        for (int64_t j = 0; j < k; j++) s += xq[i * k + j];
        xsum[i] = s;
    }
    const bitlm_dense_problem p = {.xq = xq, .a = a, .xsum = xsum, .w = w, .scale = scale, .y = y, .M = m, .N = n, .K = k};
    const int rc = run_dense(&p, active()->dense_i8a8);
    free(xsum);
    return rc;
}

BITLM_API int bitlm_dense_bf16(const float *x, int64_t m, int64_t k, const uint16_t *w, int64_t n, float *y) {
    if (!x || !w || !y || m < 0 || k < 0 || n < 0) return BITLM_EINVAL;
    const bitlm_dense_problem p = {.x = x, .y = y, .M = m, .N = n, .K = k, .wb = w};
    return run_dense(&p, active()->dense_bf16);
}

/* ---- bandwidth probe ------------------------------------------------------------------------- */

typedef struct {
    bitlm_read_fn fn;
    const uint8_t *src;
    uint8_t *dst;
    uint64_t sum;
} mem_task;

#define MEM_GRAIN 4096 /* bytes: one page, keeps every range 64-byte aligned */

static void mem_read_run(void *ctx, int64_t b, int64_t e) {
    mem_task *t = (mem_task *)ctx;
    __atomic_fetch_xor(&t->sum, t->fn(t->src + b, (size_t)(e - b)), __ATOMIC_RELAXED);
}

static void mem_copy_run(void *ctx, int64_t b, int64_t e) {
    mem_task *t = (mem_task *)ctx;
    memcpy(t->dst + b, t->src + b, (size_t)(e - b));
}

BITLM_API uint64_t bitlm_mem_read(const void *buf, size_t n) {
    mem_task t;
    memset(&t, 0, sizeof t);
    t.fn = active()->mem_read;
    t.src = (const uint8_t *)buf;
    bitlm_parallel_for((int64_t)(n & ~(size_t)63), MEM_GRAIN, 256, mem_read_run, &t);
    return t.sum;
}

BITLM_API void bitlm_mem_copy(void *dst, const void *src, size_t n) {
    mem_task t;
    memset(&t, 0, sizeof t);
    t.src = (const uint8_t *)src;
    t.dst = (uint8_t *)dst;
    bitlm_parallel_for((int64_t)n, MEM_GRAIN, 256, mem_copy_run, &t);
}
