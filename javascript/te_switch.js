// TE Switch: keep the "CLIP Skip & Text Encoders" panel in step with the loaded model, the prompt's
// LoRAs and the top bar.
//
// The panel has a hidden "sync" button; clicking it makes the server re-read the live model
// (which slots exist, the effective-layer line, the encoder lists, per-checkpoint memory). We
// click it when settings change (A1111 loads a new checkpoint inside that change), when a
// generation finishes (Forge loads the model then; a swap may have changed the token chunk
// length), and shortly after the checkpoint dropdown changes. Uses only helpers from the
// WebUI's script.js / ui.js / token-counters.js (gradioApp, onUiLoaded, onAfterUiUpdate,
// onOptionsChanged, update_token_counter), which A1111 1.10 and Forge 2 both ship.
//
// The top bar: our "CLIP Skip (0 = Auto)" quicksettings slider takes the place of the WebUI's own
// (A1111's CLIP_stop_at_last_layers entry, Forge's built-in "Clip skip" slider, which Forge shows in
// its sd/all presets only), so the bar has exactly one clip-skip control in every preset. The tab's
// slider and the bar's show one value: the server sets the option when the tab moves and we move the
// bar (teSwitchMirrorBar); when the bar moves, each tab's hidden "follow" button makes it follow.

(function() {
    "use strict";

    var TABS = ["txt2img", "img2img"];
    var lastSeen = {checkpoint: null, info: {}, prompt: {}};
    var syncTimer = null;
    var recommendTimer = null;
    var BAR_ID = "setting_te_switch_clip_skip";

    function panelPrefix(tab) {
        // every element id is Script.elem_id(item): "script_<tab>_clip_skip__text_encoders_<item>"
        var accordion = gradioApp().querySelector('.te-switch[id^="script_' + tab + '_"]');
        if (!accordion || !accordion.id.endsWith("accordion")) return null;
        return accordion.id.slice(0, -"accordion".length);
    }

    function byId(id) {
        return gradioApp().getElementById(id);
    }

    function clickAll(item) {
        TABS.forEach(function(tab) {
            var prefix = panelPrefix(tab);
            var button = prefix && byId(prefix + item);
            if (button) button.click();
        });
    }

    function clickSync() {
        clickAll("sync");
        setTimeout(function() {
            clickAll("recommend");
        }, 300);
    }

    // the prompt's LoRAs changed (typed, pasted, a Lora card clicked): refresh the recommendation
    function watchPrompts() {
        var changed = false;
        TABS.forEach(function(tab) {
            var box = gradioApp().querySelector("#" + tab + "_prompt textarea");
            var text = box ? box.value : "";
            if (lastSeen.prompt[tab] !== undefined && lastSeen.prompt[tab] !== text) changed = true;
            lastSeen.prompt[tab] = text;
        });
        if (changed) scheduleRecommend();
    }

    function scheduleRecommend() {
        clearTimeout(recommendTimer);
        recommendTimer = setTimeout(function() {
            clickAll("recommend");
        }, 400);
    }

    // our bar slider in place of the WebUI's own clip skip control
    function placeBarSlider() {
        var ours = byId(BAR_ID);
        var bar = byId("quicksettings");
        if (!ours || !bar || !bar.contains(ours)) return;
        var native = byId("setting_CLIP_stop_at_last_layers");
        if (native && bar.contains(native)) native.classList.add("te-switch-replaced");
        bar.querySelectorAll('input[type=range][min="1"][max="12"]').forEach(function(range) {
            var block = range.closest(".block");
            if (!block || ours.contains(block) || block.classList.contains("te-switch-replaced")) return;
            if (block.id && block.id.indexOf("setting_") === 0) return;
            block.classList.add("te-switch-replaced"); // Forge's own "Clip skip" (main_entry)
            block.parentElement.insertBefore(ours, block);
        });
        var number = ours.querySelector("input[type=number]");
        ours.classList.toggle("te-switch-bar-auto", !!number && Number(number.value) === 0);
    }

    function setSlider(root, value) {
        if (!root) return;
        root.querySelectorAll("input[type=number], input[type=range]").forEach(function(input) {
            if (String(input.value) === String(value)) return;
            input.value = value;
            input.dispatchEvent(new Event("input", {bubbles: true})); // display only: no release, no save
        });
    }

    // after the tab set the page's clip skip: the bar shows it, the other tab follows
    window.teSwitchMirrorBar = function(auto, value) {
        var n = auto ? 0 : value;
        setSlider(byId(BAR_ID), n);
        if (typeof opts === "object" && opts) opts.te_switch_clip_skip = n;
        setTimeout(function() {
            clickAll("follow");
        }, 100);
        return [];
    };

    function scheduleSync(delays) {
        (delays || [0]).forEach(function(ms) {
            setTimeout(clickSync, ms);
        });
    }

    function debouncedSync() {
        clearTimeout(syncTimer);
        syncTimer = setTimeout(clickSync, 300);
    }

    function checkpointValue() {
        var input = gradioApp().querySelector("#setting_sd_model_checkpoint input, .model_selection input");
        return input ? input.value : null;
    }

    function refreshTokenCounters(tab) {
        if (typeof update_token_counter !== "function") return;
        update_token_counter(tab + "_token_button");
        update_token_counter(tab + "_negative_token_button");
    }

    // Auto ticked: the slider is only showing where it rests, so it looks inactive
    function markSlider(tab) {
        var prefix = panelPrefix(tab);
        if (!prefix) return;
        var auto = byId(prefix + "clip_skip_auto");
        var slider = byId(prefix + "clip_skip");
        var box = auto && auto.querySelector("input[type=checkbox]");
        if (box && slider) slider.classList.toggle("te-switch-inactive", box.checked);
    }

    // mirror the panel's hint ("Long-CLIP: 246-token chunks after the next generation") by the counter
    function mirrorHint(tab) {
        var prefix = panelPrefix(tab);
        var counter = byId(tab + "_token_counter");
        if (!prefix || !counter) return;
        var source = byId(prefix + "hint");
        var text = source ? source.textContent.trim() : "";
        var hint = counter.parentElement.querySelector(".te-switch-token-hint");
        if (!text) {
            if (hint) hint.remove();
            return;
        }
        if (!hint) {
            hint = document.createElement("span");
            hint.className = "te-switch-token-hint";
            counter.insertAdjacentElement("afterend", hint);
        }
        if (hint.textContent !== text) hint.textContent = text;
    }

    function watchGenerations() {
        var finished = false;
        TABS.forEach(function(tab) {
            var info = byId("html_info_" + tab);
            var text = info ? info.textContent : "";
            if (lastSeen.info[tab] !== undefined && lastSeen.info[tab] !== text) {
                finished = true;
                refreshTokenCounters(tab);
            }
            lastSeen.info[tab] = text;
        });
        var checkpoint = checkpointValue();
        var changed = lastSeen.checkpoint !== null && checkpoint !== lastSeen.checkpoint;
        lastSeen.checkpoint = checkpoint;
        if (changed) scheduleSync([500, 3000, 10000]); // the load may still be running
        if (finished) debouncedSync();
    }

    onUiLoaded(function() {
        placeBarSlider();
        clickAll("follow");
        TABS.forEach(function(tab) {
            // typing changes no DOM node, so onAfterUiUpdate alone would miss it
            var box = gradioApp().querySelector("#" + tab + "_prompt textarea");
            if (box) box.addEventListener("input", scheduleRecommend);
        });
        TABS.forEach(function(tab) {
            var prefix = panelPrefix(tab);
            var auto = prefix && byId(prefix + "clip_skip_auto");
            if (auto) {
                auto.addEventListener("change", function() {
                    markSlider(tab);
                });
            }
            markSlider(tab);
        });
        scheduleSync([0]);
    });

    onAfterUiUpdate(function() {
        TABS.forEach(function(tab) {
            markSlider(tab);
            mirrorHint(tab);
        });
        watchGenerations();
        watchPrompts();
        placeBarSlider();
        document.querySelectorAll(".te-switch-refresh").forEach(function(button) {
            button.title = "Rescan the encoder folders for new or removed files";
        });
    });

    onOptionsChanged(function() {
        clickAll("follow");
        debouncedSync();
        TABS.forEach(refreshTokenCounters);
    });
})();
