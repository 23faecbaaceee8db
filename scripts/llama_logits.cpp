// hubtool's probe of llama.cpp: every position's logits and a greedy continuation for given token ids.
//
// Built by scripts/install_llama_cpp.sh against the vendored llama.cpp (llama.h), beside its tools, because
// the ctypes binding shipped in the same llama-cpp-python sdist (0.3.36) does not match the vendored
// header (llama_context_params has a field more) and crashes in llama_decode.
//
// usage: llama-logits MODEL.gguf OUT.f32 NEW_TOKENS THREADS < prompts.txt
//   prompts.txt: one prompt per line, its token ids separated by spaces.
//   OUT.f32: for each prompt, its n_tokens x n_vocab logits (float32, little endian), one after the other.
//   stdout: "n_vocab N" then, per prompt, "greedy ID ID ...".
// usage: llama-logits MODEL.gguf --tokenize < texts.txt   (one text per line, \n written as the two chars \n)
//   stdout: per text, "tokens ID ID ..." (llama_tokenize with the model's special tokens added).
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static int argmax(const float * v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (v[i] > v[best]) best = i;
    }
    return best;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT.f32 NEW_TOKENS THREADS < prompts.txt\n", argv[0]);
        return 2;
    }
    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
    }, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::string line;
    if (strcmp(argv[2], "--tokenize") == 0) {
        while (std::getline(std::cin, line)) {
            std::string text;
            for (size_t i = 0; i < line.size(); i++) {
                if (line[i] == '\\' && i + 1 < line.size() && line[i + 1] == 'n') { text += '\n'; i++; }
                else text += line[i];
            }
            std::vector<llama_token> ids(text.size() + 8);
            int n = llama_tokenize(vocab, text.c_str(), (int) text.size(), ids.data(), (int) ids.size(), true, false);
            printf("tokens");
            for (int i = 0; i < n; i++) printf(" %d", ids[i]);
            printf("\n");
        }
        llama_model_free(model);
        return 0;
    }
    if (argc < 5) return 2;
    const int n_new = atoi(argv[3]);
    std::vector<std::vector<llama_token>> prompts;
    size_t longest = 0;
    while (std::getline(std::cin, line)) {
        std::istringstream ss(line);
        std::vector<llama_token> ids;
        int id;
        while (ss >> id) ids.push_back(id);
        if (!ids.empty()) prompts.push_back(ids);
        longest = std::max(longest, ids.size());
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (longest + n_new + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = atoi(argv[4]);
    cp.n_threads_batch = cp.n_threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama.cpp could not make a context\n");
        return 1;
    }
    FILE * out = fopen(argv[2], "wb");
    printf("n_vocab %d\n", n_vocab);
    llama_batch batch = llama_batch_init((int) cp.n_ctx, 0, 1);
    for (const auto & ids : prompts) {
        llama_memory_clear(llama_get_memory(ctx), true);
        batch.n_tokens = (int) ids.size();
        for (size_t i = 0; i < ids.size(); i++) {
            batch.token[i] = ids[i];
            batch.pos[i] = (llama_pos) i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed\n");
            return 1;
        }
        for (size_t i = 0; i < ids.size(); i++) {
            fwrite(llama_get_logits_ith(ctx, (int) i), sizeof(float), n_vocab, out);
        }
        int tok = argmax(llama_get_logits_ith(ctx, (int) ids.size() - 1), n_vocab);
        printf("greedy");
        for (int k = 0; k < n_new; k++) {
            printf(" %d", tok);
            batch.n_tokens = 1;
            batch.token[0] = tok;
            batch.pos[0] = (llama_pos) (ids.size() + k);
            batch.n_seq_id[0] = 1;
            batch.seq_id[0][0] = 0;
            batch.logits[0] = 1;
            if (llama_decode(ctx, batch) != 0) break;
            tok = argmax(llama_get_logits_ith(ctx, 0), n_vocab);
        }
        printf("\n");
    }
    fclose(out);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
