# make demo: the main job on data every machine has; make test: the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench bench-gpu bench-quality bench-quality-scan bench-scan bench-sweep bench-asr bench-asr-scan bench-asr-memory bench-forecast bench-truncation clean

$(BIN)/bptt: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, by exact version: pip takes the local CPU wheel and never a CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(BIN)/bptt

setup: $(BIN)/bptt

# the main job: a Ray Tune sweep of 4 quickstart trials, each a Ray Train job, tracked in ./mlflow.db
demo: $(BIN)/bptt
	$(BIN)/bptt sweep --config conf/sweep/quickstart.yaml

# ruff first (its rules: [tool.ruff] in pyproject.toml), then pytest:
# two processes, a test module each at a time, the longest modules first (tests/conftest.py)
TEST_WORKERS ?= 2
test: $(BIN)/bptt
	$(BIN)/ruff check bptt tests benchmarks
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# throughput (bare kernel vs plain loop vs bptt fit) of four models and stream-mode memory: 12 minutes for the
# two large models (--setups word_2x650 char_2x512), a few more for the small two
bench: $(BIN)/bptt
	$(BIN)/python benchmarks/throughput.py

# tiny Shakespeare trained on 32.8M characters (4,000 steps; 30-40 minutes on 2 cores); needs $$BPTT_DATA_DIR (default ../shared/data)
bench-quality: $(BIN)/bptt
	$(BIN)/python benchmarks/quality_lm.py

# the same budget with a minGRU core trained by a parallel scan; target: within 0.05 of the LSTM recipe
bench-quality-scan: $(BIN)/bptt
	$(BIN)/python benchmarks/quality_lm.py --config conf/lm/tinyshakespeare_char_scan.yaml --target 1.40 \
		--run-dir runs/bench/quality_lm_scan --out benchmarks/results/quality_lm_scan.json

# sweep overhead against `bptt fit` one after another (CPU seconds by process), and 1 vs 2 workers per trial: about 14 minutes
bench-sweep: $(BIN)/bptt
	$(BIN)/python benchmarks/sweep_overhead.py

# FSDD connected-digit training for 4,000 steps of 32 utterances (15 minutes on 2 cores), then the test split's digit error rate; needs $$BPTT_DATA_DIR
bench-asr: $(BIN)/bptt
	$(BIN)/python benchmarks/quality_asr.py

# the same with a 3 x 256 minGRU core trained by a parallel scan in place of the GRU; target 4%
SCAN_CORE := {"class_path": "bptt.models.MinGRU", "init_args": {"hidden_size": 256, "num_layers": 3, "dropout": 0.1}}
bench-asr-scan: $(BIN)/bptt
	$(BIN)/python benchmarks/quality_asr.py --target 0.04 --run-dir runs/bench/quality_asr_scan \
		--out benchmarks/results/quality_asr_scan.json --model.rnn_type null --model.hidden_size null \
		--model.num_layers null --model.conv_channels 192 --model.core '$(SCAN_CORE)'

# windows T = 64, 256, 1024 (about 6 minutes): minGRU / minLSTM by scan, log-space scan, loop and step by step, and torch's LSTM;
# then T = 4096 one core per process (about 12 minutes, 15 GB at the peak)
bench-scan: $(BIN)/bptt
	$(BIN)/python benchmarks/parallel_time.py
	$(BIN)/python benchmarks/parallel_time.py --windows 4096 --cores MinGRU --out benchmarks/results/parallel_time_4096_mingru.json
	$(BIN)/python benchmarks/parallel_time.py --windows 4096 --cores MinLSTM --out benchmarks/results/parallel_time_4096_minlstm.json

# peak memory of CTC training on a 10-second and a 10-minute utterance: about 2 minutes
bench-asr-memory: $(BIN)/bptt
	$(BIN)/python benchmarks/memory_asr.py

# co2 (two recipes) and sunspots against persistence, seasonal naive, drift, ETS, SARIMA and Theta by horizon (rolling origin): about 25 minutes, the co2 SARIMA grids most of it
bench-forecast: $(BIN)/bptt
	$(BIN)/python benchmarks/quality_forecast.py --config conf/forecast/co2.yaml --horizons 1,4,13,52 \
		--task.horizon_mode recursive --trainer.check_val_every_n_epoch 50
	$(BIN)/python benchmarks/quality_forecast.py --config conf/forecast/co2_year.yaml --horizons 1,4,13,52
	$(BIN)/python benchmarks/quality_forecast.py --config conf/forecast/sunspots.yaml --horizons 1,3,11 \
		--model.horizon 11 --data.batch_size 4
	$(BIN)/python benchmarks/quality_forecast.py --config conf/forecast/sunspots_cycle.yaml --horizons 1,3,11 \
		--seeds 0,1,2,3,4
	for calibration in none validation rolling; do \
		$(BIN)/python benchmarks/quality_forecast.py --config conf/forecast/co2_year.yaml --horizons 1,4,13,52 \
			--task.loss quantile --model.num_outputs 3 --task.conformal $$calibration --no-baselines \
			--run-dir runs/bench/quality_forecast_co2_year_$$calibration \
			--out benchmarks/results/quality_forecast_co2_year_intervals_$$calibration.json || exit 1; \
		$(BIN)/python benchmarks/quality_forecast.py --config conf/forecast/sunspots_cycle.yaml --horizons 1,3,11 \
			--task.loss quantile --model.num_outputs 3 --task.conformal $$calibration --no-baselines \
			--run-dir runs/bench/quality_forecast_sunspots_cycle_$$calibration \
			--out benchmarks/results/quality_forecast_sunspots_cycle_intervals_$$calibration.json || exit 1; \
	done
	$(BIN)/python benchmarks/forecast_latency.py --horizon 104

# on a machine with a CUDA GPU (python3 there must have the project's dependencies): the GPU tests (host waits per
# step under task.host_reads, cuDNN, bf16/16-mixed) and throughput of the two benchmark models with every variant;
# OUT (default benchmarks/results) receives gpu_tests.log and throughput_gpu.json. About 8 minutes on an H200
OUT ?= benchmarks/results
bench-gpu:
	python3 -m pytest -p no:cacheprovider -q -m gpu tests > $(OUT)/gpu_tests.log 2>&1 || { cat $(OUT)/gpu_tests.log; exit 1; }
	tail -3 $(OUT)/gpu_tests.log
	python3 benchmarks/throughput.py --accelerator gpu --skip-memory --steps 100 --rounds 1 \
		--setups word_2x650 char_2x512 --out $(OUT)/throughput_gpu.json

# copy memory learnt with windows shorter and longer than its lag: about 4 minutes
bench-truncation: $(BIN)/bptt
	$(BIN)/python benchmarks/truncation.py

clean:
	rm -rf runs .pytest_cache
