import { Dialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { ICheckpoint, ISession } from '../tokens';
import { joinArgs, splitArgs } from '../format';

export interface IForkEdits {
  args: string[];
  checkpoint: string | null;
  memo: string;
}

/** The fork dialog's body: the arguments to edit and the checkpoint the child loads. */
export class ForkBody extends Widget implements Dialog.IBodyWidget<IForkEdits> {
  constructor(session: ISession, checkpoints: ICheckpoint[]) {
    super();
    this.addClass('jp-NSML-fork');
    const field = (label: string, input: HTMLElement) => {
      const l = document.createElement('label');
      l.textContent = label;
      l.append(input);
      this.node.append(l);
    };
    const info = document.createElement('div');
    info.className = 'jp-NSML-forkinfo';
    info.textContent = `${session.entry} on ${session.datasets.join(', ') || 'no dataset'}`;
    this.node.append(info);
    this._args = document.createElement('input');
    this._args.className = 'jp-mod-styled';
    this._args.value = joinArgs(session.args);
    this._args.setAttribute('aria-label', 'Arguments');
    field('Arguments', this._args);
    this._checkpoint = document.createElement('select');
    this._checkpoint.className = 'jp-mod-styled';
    this._checkpoint.setAttribute('aria-label', 'Checkpoint');
    const none = new Option('(none: start fresh)', '');
    this._checkpoint.append(none);
    for (const c of checkpoints) {
      this._checkpoint.append(
        new Option(`${c.name}${c.step !== null ? ` (step ${c.step})` : ''}`, c.name)
      );
    }
    if (checkpoints.length) {
      this._checkpoint.value = checkpoints[checkpoints.length - 1].name;
    }
    field('Checkpoint', this._checkpoint);
    this._memo = document.createElement('input');
    this._memo.className = 'jp-mod-styled';
    this._memo.value = `fork of ${session.name}`;
    this._memo.setAttribute('aria-label', 'Memo');
    field('Memo', this._memo);
  }

  /** The edits; throws (the dialog shows it) when the arguments have an unclosed quote. */
  getValue(): IForkEdits {
    return {
      args: splitArgs(this._args.value),
      checkpoint: this._checkpoint.value || null,
      memo: this._memo.value
    };
  }

  private _args: HTMLInputElement;
  private _checkpoint: HTMLSelectElement;
  private _memo: HTMLInputElement;
}
