# BitDistiller pipeline: data-free teacher shards (the same cached directory as llm-qat.mk) ->
# asymmetric clipping init (qat-clip) -> QAT with the confidence-aware KL (qat-distill) ->
# real bit-packing (qat-pack) -> perplexity of the packed model, plus FP, RTN and clip-only
# baselines and a Markdown report.
#
#   make -f pipelines/bitdistiller.mk -j3                  # W3G32, NF3G32, W2G32 in parallel
#   make -f pipelines/bitdistiller.mk LOSS=fkl CLIP=0      # ablations: forward KL, no clipping
#   make -f pipelines/bitdistiller.mk plots                # FKL vs CAKLD loss curves (both trained)
#
# Student names are short scheme names; pipelines/schemes/<model>/<name>.json, if present,
# overrides them (stories260K: down_proj groups of 43, since 32 does not divide 172).
# Every target appears only when its stage has finished (tools rename into place), so an
# interrupted run resumes and finished stages are never redone.

include pipelines/shards.mk
.DEFAULT_GOAL := all

STUDENTS ?= W3G32 NF3G32 W2G32
LOSS ?= cakld
# 1: initialize the student from qat-clip's clamped weights; 0: from the teacher.
CLIP ?= 1
EPOCHS ?= 1
LR ?= 1e-3
BATCH ?= 16
# Extra qat-distill flags; name them in TAG so that different recipes get different directories.
DISTILL_FLAGS ?=
TAG ?=
CLIP_TAG := $(if $(filter 1,$(CLIP)),clip,noclip)
RECIPE := $(SHARD_NAME)-$(LOSS)-$(CLIP_TAG)-e$(EPOCHS)-lr$(LR)$(TAG)
STUDENT_DIR := $(OUT)/students/$(RECIPE)
PACKED_DIR := $(OUT)/packed/$(RECIPE)

init_model = $(if $(filter 1,$(CLIP)),$(CLIPPED)/$(1),$(MODEL))
init_dep = $(if $(filter 1,$(CLIP)),$(CLIPPED)/$(1)/model.safetensors,$(MODEL_STAMP))

.PHONY: all shards clipped students packed report plots
all: report
shards: $(SHARDS).summary.json
clipped: $(foreach s,$(STUDENTS),$(CLIPPED)/$(s)/model.safetensors)
students: $(foreach s,$(STUDENTS),$(STUDENT_DIR)/$(s)/model.safetensors)
packed: $(foreach s,$(STUDENTS),$(PACKED_DIR)/$(s)/quant_scheme.json)

.SECONDEXPANSION:
$(STUDENT_DIR)/%/model.safetensors: $(SHARDS).summary.json $$(call init_dep,$$*)
	@mkdir -p $(STUDENT_DIR)
	$(BIN)/qat-distill --model $(call init_model,$*) --shards $(SHARDS) --out $(STUDENT_DIR)/$* \
	    --scheme $(call scheme_arg,$*) --loss $(LOSS) --epochs $(EPOCHS) --lr $(LR) -b $(BATCH) \
	    --seed $(SEED) --resume $(DISTILL_FLAGS) > $(STUDENT_DIR)/$*.distill.json

$(PACKED_DIR)/%/quant_scheme.json: $(STUDENT_DIR)/%/model.safetensors
	@mkdir -p $(PACKED_DIR)
	$(BIN)/qat-pack --model $(STUDENT_DIR)/$* --out $(PACKED_DIR)/$* > $(PACKED_DIR)/$*.pack.json

# The clipped teacher without training (how much the initialization alone recovers).
$(EVAL)/clip-$(SHARD_NAME)-%.json: $(CLIPPED)/%/model.safetensors $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(CLIPPED)/$* $(EVAL_FLAGS) > $@.tmp
	mv $@.tmp $@

$(EVAL)/bd-$(RECIPE)-%.json: $(PACKED_DIR)/%/quant_scheme.json $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(PACKED_DIR)/$* $(EVAL_FLAGS) > $@.tmp
	mv $@.tmp $@

REPORT := $(OUT)/report-bd-$(RECIPE).md
report: $(REPORT)
	@cat $(REPORT)
$(REPORT): $(EVAL)/fp.json $(foreach s,$(STUDENTS),$(EVAL)/rtn-$(s).json $(EVAL)/bd-$(RECIPE)-$(s).json $(if $(filter 1,$(CLIP)),$(EVAL)/clip-$(SHARD_NAME)-$(s).json))
	python3 pipelines/report.py --fp $(EVAL)/fp.json --shards $(SHARDS) \
	    $(foreach s,$(STUDENTS),--student $(s) $(EVAL)/rtn-$(s).json $(EVAL)/bd-$(RECIPE)-$(s).json $(STUDENT_DIR)/$(s) \
	    --packed $(s) $(PACKED_DIR)/$(s).pack.json \
	    $(if $(filter 1,$(CLIP)),--clip-only $(s) $(EVAL)/clip-$(SHARD_NAME)-$(s).json)) > $@.tmp
	mv $@.tmp $@

# Forward KL against CAKLD: both recipes' training loss curves of each student on one chart
# (qat-report plot). Both must have been trained: `make -f pipelines/bitdistiller.mk students`
# with LOSS=fkl and with the default LOSS=cakld (same CLIP, EPOCHS, LR, TAG).
recipe_of = $(SHARD_NAME)-$(1)-$(CLIP_TAG)-e$(EPOCHS)-lr$(LR)$(TAG)
PLOTS ?= $(OUT)/plots
SMOOTH ?= 8
PLOT_NAME := loss-$(call recipe_of,fkl-vs-cakld)
plots: $(foreach s,$(STUDENTS),$(PLOTS)/$(PLOT_NAME)-$(s).png)
$(PLOTS)/$(PLOT_NAME)-%.png: $(OUT)/students/$(call recipe_of,fkl)/%/train_log.jsonl $(OUT)/students/$(call recipe_of,cakld)/%/train_log.jsonl
	@mkdir -p $(PLOTS)
	$(BIN)/qat-report plot $^ --label "$* FKL" --label "$* CAKLD" --smooth $(SMOOTH) \
	    --title "$* on $(SHARD_NAME): forward KL vs CAKLD (moving average of $(SMOOTH) steps)" -o $@ > /dev/null
