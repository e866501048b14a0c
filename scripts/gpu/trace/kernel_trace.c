// A CUDA injection library (CUDA_INJECTION64_PATH) that writes every kernel the process runs,
// graph nodes included, and every memory copy (named "memcpy_HtoD_<bytes>B" and so on) as
// "start_ns end_ns stream name" lines to $LORAPLANE_TRACE_OUT
// (default /tmp/kernel-trace.txt), through CUPTI's activity API. The GPU machine has ncu but
// no nsys; scripts/gpu/timeline.py reads the file. Built here by build-trace.sh.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

enum { BUFFER_BYTES = 16 << 20 };

static FILE* out;

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *buffer = aligned_alloc(ACTIVITY_RECORD_ALIGNMENT, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size,
                                      size_t valid) {
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity* rec = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            const CUpti_ActivityKernel10* k = (const CUpti_ActivityKernel10*)rec;
            fprintf(out, "%llu %llu %u %s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                    k->streamId, k->name);
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6* m = (const CUpti_ActivityMemcpy6*)rec;
            static const char* kinds[] = {"unknown", "HtoD", "DtoH", "HtoA", "AtoH", "AtoA", "AtoD", "DtoA", "DtoD", "HtoH", "PtoP"};
            const char* kind = m->copyKind < sizeof kinds / sizeof *kinds ? kinds[m->copyKind] : "other";
            fprintf(out, "%llu %llu %u memcpy_%s_%lluB\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->streamId, kind, (unsigned long long)m->bytes);
        }
    }
    free(buffer);
}

static void flush_at_exit(void) {
    cuptiActivityFlushAll(1);
    fclose(out);
}

int InitializeInjection(void) {
    const char* path = getenv("LORAPLANE_TRACE_OUT");
    if (!path) path = "/tmp/kernel-trace.txt";
    out = fopen(path, "w");
    if (!out) {
        fprintf(stderr, "kernel_trace: cannot write %s; no trace\n", path);
        return 0;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS) {
        fprintf(stderr, "kernel_trace: CUPTI activity setup failed\n");
        return 0;
    }
    cuptiActivityFlushPeriod(200);
    atexit(flush_at_exit);
    return 1;
}
