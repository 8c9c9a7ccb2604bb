# LLM-QAT pipeline: data-free teacher shards -> (distill -> eval: next issues).
#
# Every stage's target is a file written atomically (tmp + rename) only when the stage has
# finished, so an interrupted stage is rerun (and resumes) and a finished one is never redone.
# The shard directory is a cached prerequisite: students made from the same teacher and
# sampling settings reuse it.
#
#   make -f pipelines/llm-qat.mk BIN=target/release QAT_DATA=../shared/data OUT=out

QAT_DATA ?= ../shared/data
BIN ?= target/release
OUT ?= out
MODEL ?= $(QAT_DATA)/models/stories260K
MODEL_NAME ?= $(notdir $(MODEL))

# Sampling settings (LLM-QAT: greedy 3..5 tokens from each vocabulary token, then T = 1).
NUM_SEQ ?= 4096
MAX_LEN ?= 256
TOPK ?= 64
SEED ?= 0
BATCH ?= 64
SHARD_NAME ?= $(MODEL_NAME)-n$(NUM_SEQ)-len$(MAX_LEN)-k$(TOPK)-s$(SEED)
SHARDS := $(OUT)/shards/$(SHARD_NAME)

.PHONY: all shards
all: shards
shards: $(SHARDS).summary.json

# The summary (qat-sample's stdout) is the stage's completion stamp.
$(SHARDS).summary.json: $(MODEL)/model.safetensors $(MODEL)/config.json $(MODEL)/tokenizer.json
	@mkdir -p $(dir $@)
	$(BIN)/qat-sample --model $(MODEL) --out $(SHARDS) -n $(NUM_SEQ) --max-len $(MAX_LEN) \
	    -K $(TOPK) --seed $(SEED) --batch-size $(BATCH) > $@.tmp
	mv $@.tmp $@
	@cat $@
