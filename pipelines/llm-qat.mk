# LLM-QAT pipeline: data-free teacher shards -> QAT students -> perplexity, plus FP and RTN
# baselines and a Markdown report.
#
# Every stage's target is a file that appears only when the stage has finished (tools write
# to temporaries and rename), so an interrupted stage is rerun (and resumes: qat-sample keeps
# verified files, qat-distill continues from its checkpoint) and a finished one is never redone.
# The shard directory is a cached prerequisite shared by all students of the same teacher and
# sampling settings: adding a student reuses it without resampling.
#
#   make -f pipelines/llm-qat.mk BIN=target/release QAT_DATA=../shared/data OUT=out
#   make -f pipelines/llm-qat.mk STUDENTS="W4A8KV8" -j2    # one more student, same shards

include pipelines/shards.mk
.DEFAULT_GOAL := all

# Students and the training recipe.
STUDENTS ?= W4 W4A8KV8 W4A8KV4
EPOCHS ?= 1
LR ?= 1e-3
BATCH ?= 16
# Extra qat-distill flags; name them in TAG so that different recipes get different directories.
DISTILL_FLAGS ?= --balance-kv 64
TAG ?= -bal64
RECIPE := $(SHARD_NAME)-e$(EPOCHS)-lr$(LR)$(TAG)
STUDENT_DIR := $(OUT)/students/$(RECIPE)

.PHONY: all shards students report
all: report
shards: $(SHARDS).summary.json
students: $(foreach s,$(STUDENTS),$(STUDENT_DIR)/$(s)/model.safetensors)

# A student directory appears (renamed into place) only when training has finished.
$(STUDENT_DIR)/%/model.safetensors: $(SHARDS).summary.json
	@mkdir -p $(STUDENT_DIR)
	$(BIN)/qat-distill --model $(MODEL) --shards $(SHARDS) --out $(STUDENT_DIR)/$* --scheme $* \
	    --epochs $(EPOCHS) --lr $(LR) -b $(BATCH) --seed $(SEED) --resume $(DISTILL_FLAGS) $(DEVICE_FLAGS) \
	    > $(STUDENT_DIR)/$*.distill.json

$(EVAL)/qat-$(RECIPE)-%.json: $(STUDENT_DIR)/%/model.safetensors $(EVAL_CORPUS)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(STUDENT_DIR)/$* $(EVAL_FLAGS) > $@.tmp
	mv $@.tmp $@

REPORT := $(OUT)/report-$(RECIPE).md
report: $(REPORT)
	@cat $(REPORT)
$(REPORT): $(EVAL)/fp.json $(foreach s,$(STUDENTS),$(EVAL)/rtn-$(s).json $(EVAL)/qat-$(RECIPE)-$(s).json)
	python3 pipelines/report.py --fp $(EVAL)/fp.json --shards $(SHARDS) \
	    $(foreach s,$(STUDENTS),--student $(s) $(EVAL)/rtn-$(s).json $(EVAL)/qat-$(RECIPE)-$(s).json $(STUDENT_DIR)/$(s)) > $@.tmp
	mv $@.tmp $@
