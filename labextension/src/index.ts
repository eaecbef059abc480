/**
 * The NSML sidebar plugin: wires the model (state), the handler (the server's forwarded API
 * and its one event stream), the views (components/) and JupyterLab (commands, palette,
 * file-browser menu, notifications, settings).
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  MainAreaWidget,
  Notification,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { PathExt } from '@jupyterlab/coreutils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { EventStream, serverApi } from './handler';
import { INotice, NSMLModel, progressFraction, sessionPath } from './model';
import {
  IRunLine,
  RUN_LINE_HINT,
  compareCode,
  parseRunLine,
  pullCode,
  pushCode,
  runCode,
  runJob
} from './jobs';
import { CommandIDs, DEFAULT_SETTINGS, ICheckpoint, ISidebarSettings, PLUGIN_ID } from './tokens';
import { IActions } from './components/actions';
import { SidebarWidget } from './components/Sidebar';
import { LogViewer } from './components/LogViewer';
import { ForkBody } from './components/ForkDialog';

const nsmlIcon = new LabIcon({
  name: 'jupyter-nsml-lab:nsml',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<rect x="3" y="4" width="18" height="4" rx="1"/><rect x="3" y="10" width="12" height="4" rx="1"/>' +
    '<rect x="3" y="16" width="15" height="4" rx="1"/></g></svg>'
});

function readSettings(s: ISettingRegistry.ISettings | null): ISidebarSettings {
  if (!s) {
    return DEFAULT_SETTINGS;
  }
  const c = s.composite as unknown as Partial<ISidebarSettings>;
  return {
    ...DEFAULT_SETTINGS,
    ...c,
    tabs: { ...DEFAULT_SETTINGS.tabs, ...(c.tabs ?? {}) }
  };
}

/** A dataset name from a folder name: the characters the service accepts. */
function datasetName(folder: string): string {
  const base = PathExt.basename(folder) || 'dataset';
  return (
    base
      .replace(/[^A-Za-z0-9._-]+/g, '-')
      .replace(/^[^A-Za-z0-9]+/, '')
      .slice(0, 64) || 'dataset'
  );
}

async function askText(title: string, label: string, value: string): Promise<string | null> {
  const body = new Widget();
  const l = document.createElement('label');
  l.className = 'jp-NSML-ask';
  l.textContent = label;
  const input = document.createElement('input');
  input.className = 'jp-mod-styled';
  input.value = value;
  input.setAttribute('aria-label', label);
  l.append(input);
  body.node.append(l);
  const result = await showDialog({
    title,
    body,
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'OK' })],
    focusNodeSelector: 'input'
  });
  return result.button.accept ? input.value.trim() : null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'NSML sessions, datasets and leaderboards in a sidebar, live.',
  autoStart: true,
  optional: [ILabShell, ILayoutRestorer, ISettingRegistry, ICommandPalette, IDefaultFileBrowser],
  activate: async (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    registry: ISettingRegistry | null,
    palette: ICommandPalette | null,
    browser: IDefaultFileBrowser | null
  ) => {
    const { commands, shell } = app;
    const model = new NSMLModel(serverApi);
    let settingsObj: ISettingRegistry.ISettings | null = null;
    if (registry) {
      try {
        settingsObj = await registry.load(PLUGIN_ID);
      } catch (e) {
        console.warn('jupyter-nsml-lab: settings not loaded, using defaults', e);
      }
    }
    let settings = readSettings(settingsObj);
    model.lowCredit = { balance: settings.lowCreditBalance, hours: settings.lowCreditHours };

    const fail = (what: string) => (e: unknown) =>
      void showErrorMessage(what, e instanceof Error ? e.message : String(e));

    const actions: IActions = {
      refresh: () => void model.refreshAll(),
      stop: name => void model.stop(name).catch(fail(`Cannot stop ${name}`)),
      remove: name =>
        void showDialog({
          title: 'Remove session',
          body: `Remove ${name} with its logs, metrics and checkpoints?`,
          buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Remove' })]
        }).then(r =>
          r.button.accept ? model.remove(name).catch(fail(`Cannot remove ${name}`)) : undefined
        ),
      logs: name => void commands.execute(CommandIDs.showLogs, { name }),
      fork: name => void forkSession(name),
      compare: names => void commands.execute(CommandIDs.compare, { names }),
      submit: name =>
        void model
          .submit(name)
          .then(sub =>
            Notification.success(`Submitted ${name} to ${sub.dataset} (#${sub.id})`, {
              autoClose: 5000
            })
          )
          .catch(fail(`Cannot submit ${name}`)),
      pull: ref => void pullDataset(ref),
      showBoard: dataset => {
        sidebar.showTab('leaderboards', { dataset });
        void model.refreshBoard(dataset);
      }
    };

    const sidebar = new SidebarWidget(model, actions, settings);
    sidebar.id = 'jp-nsml-sidebar';
    sidebar.title.icon = nsmlIcon;
    sidebar.title.caption = 'NSML';
    shell.add(sidebar, 'left', { rank: 600 });
    restorer?.add(sidebar, 'nsml-sidebar');

    // ---- live updates: the one stream, plus a slow refresh for GPU use and metrics --------
    const stream = new EventStream(
      event => void model.applyStreamEvent(event),
      live => (model.live = live)
    );
    let slow = 0;
    const applyRefresh = () => {
      window.clearInterval(slow);
      if (settings.refresh === 'live') {
        stream.start();
        // GPU use and metrics change without events; and while the stream's upstream is
        // down, this is what still brings state changes (and their notifications).
        slow = window.setInterval(
          () => {
            void model.refreshSessions();
            void model.refreshMe();
          },
          Math.max(5, settings.refreshSeconds) * 1000
        );
      } else {
        stream.stop();
      }
    };
    settingsObj?.changed.connect(() => {
      settings = readSettings(settingsObj);
      model.lowCredit = { balance: settings.lowCreditBalance, hours: settings.lowCreditHours };
      sidebar.setSettings(settings);
      applyRefresh();
    });
    void model.refreshAll();
    applyRefresh();

    // ---- notifications ---------------------------------------------------------------------
    model.notice.connect((_, n: INotice) => {
      if (!settings.notifications) {
        return;
      }
      const options = {
        autoClose: n.level === 'error' || n.level === 'warning' ? (false as const) : 8000,
        actions: n.session
          ? [
              {
                label: 'Open',
                caption: `Show ${n.session} in the NSML sidebar`,
                callback: () => void commands.execute(CommandIDs.openSession, { name: n.session! })
              }
            ]
          : []
      };
      Notification.emit(n.message, n.level, options);
    });

    // ---- actions that need dialogs or jobs ---------------------------------------------------
    async function forkSession(name: string): Promise<void> {
      const parent = model.sessions.get(name);
      if (!parent) {
        return;
      }
      let checkpoints: ICheckpoint[] = [];
      try {
        checkpoints = (
          await serverApi.get<{ checkpoints: ICheckpoint[] }>(
            `sessions/${sessionPath(name)}/checkpoints`
          )
        ).checkpoints;
      } catch {
        checkpoints = [];
      }
      const result = await showDialog({
        title: `Fork ${name}`,
        body: new ForkBody(parent, checkpoints),
        buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Fork' })]
      });
      if (!result.button.accept || !result.value) {
        return;
      }
      try {
        const child = await model.fork(name, {
          args: result.value.args,
          checkpoint: result.value.checkpoint,
          memo: result.value.memo
        });
        Notification.success(`Forked ${name} as ${child.name}`, { autoClose: 5000 });
      } catch (e) {
        fail(`Cannot fork ${name}`)(e);
      }
    }

    async function job(label: string, code: string): Promise<{ [k: string]: string } | null> {
      const id = `${label}-${Date.now()}`;
      model.setJob({ id, label, fraction: null, phase: 'starting', state: 'running', message: '' });
      try {
        const result = await runJob(app.serviceManager, code, p =>
          model.setJob({
            id,
            label,
            fraction: progressFraction(p.done, p.total),
            phase: p.phase,
            state: 'running',
            message: ''
          })
        );
        const what = result.ref ?? result.name ?? '';
        model.setJob({ id, label, fraction: 1, phase: 'done', state: 'done', message: what });
        window.setTimeout(() => model.dropJob(id), 15000);
        return result;
      } catch (e) {
        const message = e instanceof Error ? e.message : String(e);
        model.setJob({ id, label, fraction: null, phase: 'failed', state: 'failed', message });
        Notification.error(`${label} failed: ${message}`, { autoClose: false });
        return null;
      }
    }

    async function pullDataset(ref: string): Promise<void> {
      const here = browser?.model.path ?? '';
      const dest = PathExt.join(here, ref.replace('@', '-v'));
      sidebar.showTab('datasets');
      const r = await job(`Pull ${ref}`, pullCode(ref, dest));
      if (r) {
        Notification.success(`Pulled ${r.ref} into ${r.dest}`, { autoClose: 5000 });
        void browser?.model.refresh();
      }
    }

    // ---- commands ----------------------------------------------------------------------------
    commands.addCommand(CommandIDs.showSessions, {
      label: 'NSML: Show sessions',
      caption: 'Open the NSML sidebar on its sessions',
      execute: () => {
        sidebar.showTab('sessions');
        shell.activateById(sidebar.id);
      }
    });
    commands.addCommand(CommandIDs.openSession, {
      label: 'NSML: Open session',
      execute: args => {
        const name = String(args.name ?? '');
        sidebar.showTab('sessions', { session: name });
        shell.activateById(sidebar.id);
      }
    });
    commands.addCommand(CommandIDs.refresh, {
      label: 'NSML: Refresh',
      execute: () => model.refreshAll()
    });
    commands.addCommand(CommandIDs.showLogs, {
      label: 'NSML: Show a session’s log',
      execute: args => {
        const name = String(args.name ?? '');
        const id = `nsml-log-${name.replace(/[^A-Za-z0-9_-]/g, '-')}`;
        const open = Array.from(shell.widgets('main')).find(w => w.id === id);
        if (open) {
          shell.activateById(id);
          return;
        }
        const widget = new MainAreaWidget({ content: new LogViewer(serverApi, name) });
        widget.id = id;
        widget.title.label = `Log: ${name}`;
        widget.title.icon = nsmlIcon;
        shell.add(widget, 'main', { mode: 'split-right' });
      }
    });
    commands.addCommand(CommandIDs.compare, {
      label: 'NSML: Compare sessions',
      execute: async args => {
        const names = (args.names as string[] | undefined) ?? [];
        if (names.length < 2) {
          return;
        }
        // A console running the comparison magic: the Bokeh panel (live, zoomable) in the
        // main area, backed by the user's kernel.
        const panel: any = await commands.execute('console:create', {
          insertMode: 'split-right',
          kernelPreference: { name: 'python3' }
        });
        panel.title.label = `Compare ${names.length} sessions`;
        await panel.sessionContext.ready;
        await panel.console.inject(compareCode(names));
      }
    });
    commands.addCommand(CommandIDs.runFile, {
      label: 'NSML: Run current file…',
      caption: 'Start an NSML session that runs the current file (its folder is the code)',
      execute: async () => {
        const current: any = shell.currentWidget;
        let path: string | undefined = current?.context?.path;
        if (!path && browser) {
          const item = browser.selectedItems().next();
          path = item && !item.done ? item.value.path : undefined;
        }
        if (!path) {
          void showErrorMessage('NSML: Run current file', 'Open or select a Python file first.');
          return;
        }
        const line = await askText(
          `Run ${PathExt.basename(path)} as an NSML session`,
          RUN_LINE_HINT,
          ''
        );
        if (line === null) {
          return;
        }
        let run: IRunLine;
        try {
          run = parseRunLine(line);
        } catch (e) {
          fail('NSML: Run current file')(e);
          return;
        }
        const r = await job(
          `Run ${PathExt.basename(path)}`,
          runCode({ folder: PathExt.dirname(path), entry: PathExt.basename(path), ...run })
        );
        if (r) {
          Notification.success(`Started ${r.name}`, {
            autoClose: 5000,
            actions: [
              {
                label: 'Open',
                callback: () => void commands.execute(CommandIDs.openSession, { name: r.name })
              }
            ]
          });
          await model.refreshSessions();
          void commands.execute(CommandIDs.openSession, { name: r.name });
        }
      }
    });
    commands.addCommand(CommandIDs.pushFolder, {
      label: 'Push to NSML as a dataset',
      caption: 'Push this folder as the next version of an NSML dataset',
      icon: nsmlIcon,
      isVisible: () => {
        const item = browser?.selectedItems().next();
        return !!item && !item.done && item.value.type === 'directory';
      },
      execute: async () => {
        const item = browser?.selectedItems().next();
        if (!item || item.done || item.value.type !== 'directory') {
          return;
        }
        const folder = item.value.path;
        const name = await askText(`Push ${folder}`, 'Dataset name', datasetName(folder));
        if (!name) {
          return;
        }
        sidebar.showTab('datasets');
        shell.activateById(sidebar.id);
        const r = await job(`Push ${name}`, pushCode(name, folder));
        if (r) {
          Notification.success(`Pushed ${folder} as ${r.ref}`, { autoClose: 5000 });
          await model.refreshDatasets();
        }
      }
    });
    app.contextMenu.addItem({
      command: CommandIDs.pushFolder,
      selector: '.jp-DirListing-item[data-isdir="true"]',
      rank: 60
    });
    if (palette) {
      for (const command of [CommandIDs.runFile, CommandIDs.showSessions, CommandIDs.refresh]) {
        palette.addItem({ command, category: 'NSML' });
      }
    }
    void labShell;
  }
};

export default plugin;
