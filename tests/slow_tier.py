"""Which default tests move to the slow tier (issue 25): single tests whose case another default test covers, and
every parametrization but the first of heavy parametrized tests (the first stays in the default tier)."""

# test id (file::function or file::function[param]) -> the default test that still covers its case
SLOW = {
    "test_tpu_compile.py::test_kernel_compiles_with_mosaic[window_attention/v5p/T8192/bfloat16/H12K12D64E64p8w512]":
        "test_window_attention's no-[T, T]-buffer HLO tests (the v5p compile figures are in BUILD_NOTES)",
    "test_hope_decode.py::test_a_memory_state_seeds_the_decode": "test_hope_decode's CLI --state test",
    "test_hope_decode.py::test_the_driver_runs_titans_mac":
        "test_titans_decode[titans_mac-on] (the same one-token path), test_hope_decode's hope_attention driver test",
    "test_titans_decode.py::test_one_token_logits_equal_the_forward[titans_mag-on]":
        "its [titans_mal-on] case (the same window ring and memory step)",
    "test_titans_decode.py::test_one_token_logits_equal_the_forward[titans_lmm-on]":
        "its [titans_mal-on] case (MAL is LMM plus the window attention)",
    "test_titans_decode.py::test_one_token_logits_equal_the_forward[titans_mag-off]": "its memory-on cases",
    "test_outer_optim.py::test_matches_the_float64_reference[muon-1]": "its [muon-4] case (steps 1 to 4)",
    "test_outer_optim.py::test_matches_the_float64_reference[m3-1]": "its [m3-5] case (steps 1 to 5)",
    "test_titans_decode.py::test_mac_decoding_continues_a_carried_memory":
        "test_memstate's titans_mac continuation, test_hope_decode's titans_mac driver test",
    "test_resume.py::test_sigterm_saves_current_step_exits_zero_and_resumes":
        "test_fault_tools dba-train writing-SIGTERM (saved step complete, resumed equal to uninterrupted)",
    "test_hope.py::test_global_teach_trains": "test_hope closed-form teach and memory tests, test_memstate",
    "test_addition.py::test_loss_from_first_label_equals_full_loss": "test_addition scanned / vmapped[map] training",
    "test_addition.py::test_vmapped_training_equals_separate_runs[vmap]": "its [map] case",
    "test_addition.py::test_sinusoidal_positions": "test_addition tie-mode forwards and training",
    "test_addition.py::test_report_lists_every_seed_with_its_grokking_steps_and_scores": "test_addition CLI tests",
    "test_seeds.py::test_sigterm_stops_the_sweep_cleanly_and_the_same_command_resumes":
        "test_seeds sweep resume, test_fault_matrix SIGTERM handling of dba-train",
    "test_surgery.py::test_init_from_with_surgery_in_the_training_loop": "test_surgery's surgery tests, init_from tests",
    "test_latentwire_interlingua.py::test_shapes_rms_and_every_parameter_gets_a_gradient":
        "test_latentwire bridge gradient tests",
    "test_bench.py::test_attention_bench_reports_every_op": "test_attention / test_selective op tests",
    "test_bench.py::test_decode_bench_reports_each_model_and_cache": "test_generate cache tests",
    "test_bench.py::test_addition_bench_times_jax_and_torch": "test_addition torch-vs-JAX step tests",
    "test_bench.py::test_gpt_torch_bench_writes_both_rates": "test_bench torch_gpt equality",
    "test_bench.py::test_convert_bench_runs_both_directions": "test_convert_* round trips",
    "test_bench.py::test_bench_runs_on_a_mesh_and_writes_its_report": "test_train / test_sharding steps, dba-bench --help",
    "test_resume.py::test_two_processes_over_loopback_match_one_process": "test_sharding, test_train data parallel",
    "test_mup.py::test_coord_check_cli_writes_csv_and_svg": "test_mup coordinate-check tests",
    "test_gpu_check.py::test_gpu_plan_kernels_lower_for_cuda": "test_kernel_lowering (every kernel for cuda)",
    "test_selective.py::test_fp32_long_scan_beats_a_sequential_sum": "test_selective_flash / cumsum scan tests",
    "test_titans_blocks.py::test_gradients_reach_every_meta_parameter[titans_mac]": "its titans_mag / titans_mal cases",
    "test_kernel_wiring.py::test_kernels_under_a_mesh_match_one_device[dba]": "its [selective] case",
    "test_kernel_wiring.py::test_pallas_model_matches_xla[selective]": "test_selective_flash model tests",
    "test_forward_goldens.py::test_pruning_matches_the_recorded_outputs[selective]": "its [selective_bos_self] case",
    "test_selective.py::test_selective_model_with_memory_penalty_trains_a_step":
        "test_config's old-workdir test trains and resumes a memory-penalty selective model",
    "test_aot.py::test_abstract_state_is_what_dba_train_passes": "test_aot compiles dba-train's step",
    "test_titans_blocks.py::test_memory_is_the_only_way_across_mac_segments": "test_titans_blocks recurrence tests",
    "test_resume.py::test_truncated_latest_checkpoint_is_skipped":
        "test_hardening::test_every_checkpoint_broken_stops_unless_restart_is_asked",
    "test_hardening.py::test_a_run_saved_before_a_config_field_was_added_still_resumes":
        "test_config::test_an_old_workdir_loads_and_resumes",
    "test_flash_attention.py::test_bfloat16_close_to_reference": "test_selective_flash reduced-precision case",
    "test_generate.py::test_full_precision_window_covering_everything_is_exact":
        "test_generate::test_window_ring_holds_the_last_tokens_exactly",
    "test_selective.py::test_protection_kinds_in_the_op":
        "test_kernel_protect_attack, test_selective protected-model case",
    "test_latentwire.py::test_teacher_forced_nll_equals_a_float64_reference":
        "test_latentwire::test_losses_match_float64_references",
}

# file::function -> every parametrization but the first moves to the slow tier
FIRST_ONLY = (
    "test_window_attention.py::test_blocked_equals_the_masked_reference",
    "test_outer_optim.py::test_a_stacked_leaf_is_one_matrix_per_layer",
    "test_selective_flash.py::test_forward_float64",
    "test_selective_flash.py::test_reduced_precision_close_to_float64",
    "test_selective_flash.py::test_tpu_tiling_matches_reference",
    "test_selective_flash.py::test_no_t_by_t_buffer_in_fused_program",
    "test_flash_attention.py::test_tpu_tiling_float64_matches_reference",
    "test_flash_attention.py::test_float32_matches_reference",
    "test_selective.py::test_protected_selective_model_trains",
    "test_selective.py::test_fp32_impls_close_to_float64",
    "test_attention.py::test_causality",
    "test_attention.py::test_dba_equals_float64_formula",
    "test_attention.py::test_dba_xla_fp32_close_to_float64_formula",
    "test_forward_goldens.py::test_forward_decode_and_probes_match_the_recorded_outputs",
    "test_kernel_wiring.py::test_pallas_model_matches_xla",
    "test_sharding.py::test_sharded_loss_and_grads_equal_one_device",
    "test_cli.py::test_bad_config_fails_clearly",
    "test_titans_blocks.py::test_causal_rows_independent_padding_masked_and_longer_than_training",
    "test_memstate.py::test_a_saved_state_continues_as_one_call",
    "test_bench.py::test_torch_gpt_matches_dba_jax_through_two_adamw_steps",
    "test_generate.py::test_cached_decoding_matches_full_forward_fp32",
    "test_generate.py::test_attention_over_a_stored_cache_within_derived_bound",
    "test_hope.py::test_inner_loop_trajectory_equals_the_buffered_float64_reference",
    "test_selective.py::test_gradients_match_reference_vjp",
    "test_compare_eval.py::test_attention_probs_reproduce_the_layer",
    "test_selfmod.py::test_rows_keep_their_own_memory",
    "test_addition.py::test_torch_batched_step_equals_single_model_steps",
)
