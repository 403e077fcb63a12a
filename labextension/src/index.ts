/**
 * Registers the jupyter-dist side panel and its commands.
 */

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';

import { DistConnection } from './connection';
import { clusterIcon } from './icon';
import { DistModel } from './model';
import { DistPanel } from './panel';

namespace CommandIDs {
  export const openPanel = 'jupyter-dist:open-panel';
  export const insertConnect = 'jupyter-dist:insert-connect';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-dist:plugin',
  description: 'A side panel for jupyter-dist clusters.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    restorer: ILayoutRestorer | null
  ) => {
    app.commands.addCommand(CommandIDs.insertConnect, {
      label: 'Insert a cell that connects to a jupyter-dist cluster',
      isEnabled: () => notebooks.currentWidget !== null,
      execute: async args => {
        const notebook = notebooks.currentWidget;
        if (!notebook) {
          Notification.warning(
            'Open a notebook first: "Insert connect" adds a cell to the active notebook.',
            { autoClose: 5000 }
          );
          return;
        }
        // Until the file has loaded, the notebook shows a placeholder cell, and
        // loading replaces every cell: one inserted now would vanish.
        await notebook.context.ready;
        const clusterId = String(args.cluster_id ?? '');
        NotebookActions.insertBelow(notebook.content);
        const cell = notebook.content.activeCell;
        if (cell) {
          cell.model.sharedModel.setSource(
            `import jupyter_dist as jd\nc = jd.Cluster.connect(${JSON.stringify(clusterId)})`
          );
        }
      }
    });
    const panel = new DistPanel({
      model: new DistModel(
        new DistConnection(app.serviceManager.serverSettings)
      ),
      onInsert: clusterId =>
        void app.commands.execute(CommandIDs.insertConnect, {
          cluster_id: clusterId
        })
    });
    panel.id = 'jupyter-dist-panel';
    panel.title.icon = clusterIcon;
    panel.title.caption = 'jupyter-dist clusters';
    app.shell.add(panel, 'left', { rank: 600 });
    restorer?.add(panel, panel.id);
    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show jupyter-dist clusters',
      execute: () => app.shell.activateById(panel.id)
    });
  }
};

export default plugin;
