// TE Switch: keep the "CLIP Skip & Text Encoders" panel in step with the loaded model.
//
// The panel has a hidden "sync" button; clicking it makes the server re-read the live model
// (which slots exist, the effective-layer line, the encoder lists, per-checkpoint memory). We
// click it when settings change (A1111 loads a new checkpoint inside that change), when a
// generation finishes (Forge loads the model then; a swap may have changed the token chunk
// length), and shortly after the checkpoint dropdown changes. Uses only helpers from the
// WebUI's script.js / ui.js / token-counters.js (gradioApp, onUiLoaded, onAfterUiUpdate,
// onOptionsChanged, update_token_counter), which A1111 1.10 and Forge 2 both ship.

(function() {
    "use strict";

    var TABS = ["txt2img", "img2img"];
    var lastSeen = {checkpoint: null, info: {}};
    var syncTimer = null;

    function panelPrefix(tab) {
        // every element id is Script.elem_id(item): "script_<tab>_clip_skip__text_encoders_<item>"
        var accordion = gradioApp().querySelector('.te-switch[id^="script_' + tab + '_"]');
        if (!accordion || !accordion.id.endsWith("accordion")) return null;
        return accordion.id.slice(0, -"accordion".length);
    }

    function byId(id) {
        return gradioApp().getElementById(id);
    }

    function clickSync() {
        TABS.forEach(function(tab) {
            var prefix = panelPrefix(tab);
            var button = prefix && byId(prefix + "sync");
            if (button) button.click();
        });
    }

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
        document.querySelectorAll(".te-switch-refresh").forEach(function(button) {
            button.title = "Rescan the encoder folders for new or removed files";
        });
    });

    onOptionsChanged(function() {
        debouncedSync();
        TABS.forEach(refreshTokenCounters);
    });
})();
