// The pack's only frontend code. Save SVDQuant Model shows where it wrote the file (its "text" UI output,
// which ComfyUI's frontend does not display on its own), and the node definitions are refreshed, so that
// Load SVDQuant Model lists the new file at once, as pressing R would.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfyui-svdquant.SaveShowsPath",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SVDQuantSaveModel") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let shown = this.widgets?.find((w) => w.name === "saved");
      if (!shown) {
        shown = this.addWidget("text", "saved", "", () => {}, { serialize: false });
        shown.serialize = false; // a display, not an input: never written into the workflow
        this.setSize(this.computeSize());
      }
      shown.value = text;
      this.setDirtyCanvas(true, true);
      app.refreshComboInNodes?.();
    };
  },
});
